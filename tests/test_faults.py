"""Fault injection over the whole pipeline: every injected fault gets its documented outcome, and
no record vanishes from the totals."""
import json

import pytest

from safemed_lib import data, faults


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    return faults.run(tmp_path_factory.mktemp("faults") / "run", n_images=12, size=56)


def test_every_fault_has_its_documented_outcome(outcome):
    table, _ = outcome
    assert set(table["fault"]) == set(faults.RECORD_FAULTS) | set(faults.FILE_FAULTS) | set(faults.OUTPUT_FAULTS)
    bad = table[~table["ok"]]
    assert bad.empty, bad.to_string()


def test_nothing_is_lost(outcome):
    _, t = outcome
    assert t["records"] == t["expected_records"]
    assert t["loaded"] + t["skipped"] + t["unknown_modality"] == t["records"]
    assert t["evaluated"] == t["loaded"]
    assert t["bad_files"] == len(faults.FILE_FAULTS)
    assert t["lost"] == 0


def test_skip_reasons_name_the_problem(outcome):
    table, _ = outcome
    detail = dict(zip(table["fault"], table["detail"]))
    assert "gt_answer" in detail["gt_ambiguous"] and "gt_answer" in detail["gt_no_match"]
    assert "f_image_gray" in detail["duplicate_id"]
    assert "UTF-8" in detail["non_utf8"] or "utf-8" in detail["non_utf8"].lower()


def test_odd_images_load_as_rgb_in_range(outcome):
    table, _ = outcome
    for fault in ("image_16bit", "image_rgba", "image_gray"):
        d = table.set_index("fault").loc[fault, "detail"]
        assert d.startswith("RGB (3, 56, 56)")


def test_strict_mode_raises_naming_file_and_record(tmp_path):
    root = tmp_path / "OmniMedVQA"
    (root / "QA_information" / "Open-access").mkdir(parents=True)
    faults.inject(root, 56)
    for p in (root / "QA_information" / "Open-access").glob("Faults-*.json"):
        p.unlink()  # leave only the record-level faults
    with pytest.raises(data.DataError) as e:
        data.load_omnimedvqa(root, strict=True)
    msg = str(e.value)
    assert "Faults.json" in msg and "0" in msg
    assert json.loads((root / "QA_information" / "Open-access" / "Faults.json").read_text())[0]["question_id"] in msg
