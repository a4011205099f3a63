"""The paper profile's code path, end to end on the CPU: every notebook runs from a local
checkpoint (``model_path``, here a Qwen2.5-VL-class checkpoint in the real on-disk layout) and a
local OmniMedVQA root (``omnimedvqa_root``), with the paper profile's model lists and prompt forms
and the smoke profile's sizes. ``make test``'s nbval pass runs only the embedded default, whose
branches differ: no scene rationales (so no think SFT), the checkpoint instead of the tiny base.
"""
import json

import yaml

from safemed_lib import data, models, reproduce, sft, synth

# the paper profile's choices of what to train and evaluate; every number comes from smoke
PAPER_KEYS = ("certify_models", "attack_models", "viz_models", "r2_models", "rob_modes", "rob_at_sft_modes",
              "gen_mode")


def test_every_notebook_runs_on_a_local_checkpoint_and_omnimedvqa_root(tmp_path, monkeypatch):
    smoke, paper = reproduce.load_profile("smoke"), reproduce.load_profile("paper")
    root = synth.ensure_benchmark(tmp_path / "bench", n_images=smoke["n_images"], seed=0, size=smoke["image_size"])
    items = data.load_omnimedvqa(root)
    ckpt = tmp_path / "Qwen2.5-VL-local"
    models.build_tiny_vlm(sft.corpus_texts(items), arch="qwen2_5_vl", image_size=smoke["image_size"]).save(ckpt)

    profile = {**smoke, **{k: paper[k] for k in PAPER_KEYS}, "profile": "paper-path",
               "omnimedvqa_root": str(root), "model_path": str(ckpt), "models_dir": str(tmp_path / "models"),
               "bench_dir": str(tmp_path / "unused")}
    prof = tmp_path / "paper-path.yaml"
    prof.write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("SAFEMED_OUTPUT_DIR", str(tmp_path / "out"))  # the notebooks' kernels inherit it

    assert reproduce.main(["--profile", str(prof), "--out", str(tmp_path / "runs")]) == 0
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [n["status"] for n in summary["notebooks"]] == ["ok"] * len(reproduce.find_notebooks())
    # the SFT baseline started from the checkpoint, not from a tiny base built here
    done = json.loads((tmp_path / "models" / "sft-nothink" / "done.json").read_text())
    assert done["tag"]["base"] == str(ckpt)
    assert not (tmp_path / "models" / "sft-think").exists()  # no rationales in a real OmniMedVQA copy
    report = (tmp_path / "out" / "results" / "REPORT.md").read_text()
    assert "paper-path" in report
