import json

import pytest

from safemed_lib.records import Records, atomic_write_text


def test_append_done_and_resume(tmp_path):
    r = Records(tmp_path / "r.jsonl")
    for i in range(3):
        r.append({"key": f"q{i}", "correct": i % 2 == 0})
    again = Records(tmp_path / "r.jsonl")
    assert again.done() == {"q0", "q1", "q2"}
    assert [x["correct"] for x in again.load()] == [True, False, True]


def test_torn_last_line_is_dropped_and_reported(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "corr')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        r = Records(p)
    assert r.done() == {"a"}
    r.append({"key": "b"})
    assert [x["key"] for x in Records(p).load()] == ["a", "b"]


def test_record_needs_a_key_and_bad_lines_are_named(tmp_path):
    r = Records(tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="key"):
        r.append({"x": 1})
    (tmp_path / "bad.jsonl").write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        Records(tmp_path / "bad.jsonl").load()


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "t.md", "hello")
    assert p.read_text() == "hello" and not list(p.parent.glob(".*tmp*"))


def test_load_run_refuses_a_file_of_another_run(tmp_path):
    r = Records(tmp_path / "r.jsonl")
    r.append({"key": "q0", "sigma": 0.25, "pred": 1})
    assert r.load_run({"sigma": 0.25}) == {"q0": {"key": "q0", "sigma": 0.25, "pred": 1}}
    with pytest.raises(ValueError, match="sigma=0.25 but this run has sigma=0.5"):
        r.load_run({"sigma": 0.5})
