import pytest

from safemed_lib import report


def test_unmeasured_claims_are_marked_not_filled(tmp_path):
    md = report.report_markdown(tmp_path, profile="smoke")
    assert md.count("not measured on this run") == len(report.CLAIMS)
    assert "84.45%" in md and "+29.94" in md


def test_recorded_claim_appears_with_verdict_and_profile(tmp_path):
    report.record_claim("safemed.sft_collapse", "96.0% -> 12.5%", True, profile="tiny",
                        detail="SFT-nothink at Linf 8/255", results=tmp_path)
    report.record_claim("medr1.cross_qtype_gain", "+3.1 points", False, profile="smoke", results=tmp_path)
    md = report.report_markdown(tmp_path, profile="tiny")
    assert "| 96.0% -> 12.5% | yes |" in md
    assert "+3.1 points (profile smoke) | **no**" in md
    assert "SFT-nothink at Linf 8/255" in md
    path = report.write_report(tmp_path, profile="tiny")
    assert path.read_text() == md


def test_unknown_claim_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown claim"):
        report.record_claim("nope", "1", True, profile="x", results=tmp_path)



def test_verdicts_table_and_readme_block(tmp_path):
    report.record_claim("safemed.sft_collapse", "96.0% -> 12.5%", True, profile="tiny", results=tmp_path)
    v = report.verdicts(["safemed.sft_collapse", "medr2.visual_cues"], results=tmp_path)
    assert v["direction holds"].tolist() == ["yes", "-"] and v["ours"].iloc[1] == "not measured"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold table\n<!-- results:end -->\nlayout\n")
    # only the project's own results/ may rewrite the README (a test run's outputs never do)
    assert not report.update_readme(tmp_path, profile="tiny", readme=readme)
    assert report.update_readme(report.PROJECT_ROOT / "results", profile="tiny", readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:begin -->\nProfile `tiny`") and text.endswith("<!-- results:end -->\nlayout\n")
    assert "old table" not in text and "| paper | claim |" in text and "](figures/" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(report.PROJECT_ROOT / "results", readme=readme)
