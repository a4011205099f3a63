"""The run cache: once per key, resumable, one done.json format, locked against a second process."""
import json
import multiprocessing
import time

import pytest

from safemed_lib import runs


def test_done_once_per_key_and_retrains_for_another(tmp_path):
    calls = []

    def fn(d):
        calls.append(d)
        (d / "out.txt").write_text("x")
        return {"n": len(calls)}

    assert runs.cached(tmp_path / "r", {"a": 1}, fn) == {"n": 1}
    assert runs.cached(tmp_path / "r", {"a": 1}, fn) == {"n": 1} and len(calls) == 1
    done = json.loads((tmp_path / "r" / "done.json").read_text())
    assert set(done) == {"format", "fingerprint", "key", "result", "seconds", "finished"}
    assert done["key"] == {"a": 1} and done["fingerprint"] == runs.fingerprint({"a": 1})
    assert runs.is_done(tmp_path / "r", {"a": 1}) and not runs.is_done(tmp_path / "r", {"a": 2})
    # another key: the folder is emptied and the work starts afresh
    (tmp_path / "r" / "stale.txt").write_text("old")
    assert runs.cached(tmp_path / "r", {"a": 2}, fn) == {"n": 2}
    assert not (tmp_path / "r" / "stale.txt").exists()


def test_an_interrupted_run_resumes_in_place(tmp_path):
    def crash(d):
        (d / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.cached(tmp_path / "r", {"k": 1}, crash)
    assert not (tmp_path / "r" / "done.json").exists()

    def resume(d):
        return (d / "partial.txt").read_text()  # what the interrupted call left is still there

    assert runs.cached(tmp_path / "r", {"k": 1}, resume) == "half"
    # an unfinished run of another key is not resumed
    with pytest.raises(KeyboardInterrupt):
        runs.cached(tmp_path / "s", {"k": 1}, crash)
    assert runs.cached(tmp_path / "s", {"k": 2}, lambda d: (d / "partial.txt").exists()) is False


def test_load_turns_a_finished_run_into_an_object(tmp_path):
    got = runs.cached(tmp_path / "r", {"k": 1}, lambda d: {"model": "m"}, load=lambda d, res: (d.name, res["model"]))
    assert got == ("r", "m")


def test_fingerprint_is_order_free_for_dicts_and_ids_digest_for_item_order():
    assert runs.fingerprint({"a": 1, "b": [1, 2]}) == runs.fingerprint({"b": [1, 2], "a": 1})
    assert runs.fingerprint({"a": 1}) != runs.fingerprint({"a": 1.5})

    class It:
        def __init__(self, q):
            self.question_id = q
    assert runs.ids_digest([It("a"), It("b")]) == runs.ids_digest([It("b"), It("a")])
    with pytest.raises(TypeError, match="cannot put object"):
        runs.fingerprint({"a": object()})


def _slow(path, out):
    def fn(d):
        time.sleep(1.0)
        return {"pid": multiprocessing.current_process().name}
    out.put(runs.cached(path, {"k": 1}, fn))


def test_a_second_process_waits_and_reads_the_first_ones_result(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_slow, args=(tmp_path / "r", q), name=f"p{i}") for i in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]  # one did the work, the other read its done.json
