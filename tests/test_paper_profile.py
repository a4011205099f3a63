"""The paper profile's code path, end to end on the CPU: every notebook runs from a local
checkpoint (``model.path``, here a Qwen2.5-VL-class checkpoint in the real on-disk layout) and a
local OmniMedVQA root (``data.omnimedvqa_root``), with the paper profile's model lists and prompt
forms and the smoke profile's sizes. ``make test``'s nbval pass runs only the embedded default, whose
branches differ: no scene rationales (so no think SFT), the checkpoint instead of the tiny base.
"""
import json

import pytest
import yaml

from safemed_lib import base, config, data, models, reproduce, synth

pytestmark = pytest.mark.notebooks

# the paper profile's choices of what to train and evaluate; every number comes from smoke
PAPER_KEYS = ("certify.models", "attack.models", "viz.models", "medr2.models", "safemed.modes",
              "safemed.at_sft.modes", "medr1.mode")


def _get(tree, dotted):
    for k in dotted.split("."):
        tree = tree[k]
    return tree


def test_every_notebook_runs_on_a_local_checkpoint_and_omnimedvqa_root(tmp_path, monkeypatch):
    smoke, paper = config.load("smoke"), config.load("paper").model_dump()
    root = synth.ensure_benchmark(tmp_path / "bench", n_images=smoke.data.n_images, seed=0,
                                  size=smoke.data.image_size)
    items = data.load_omnimedvqa(root)
    ckpt = tmp_path / "Qwen2.5-VL-local"
    models.build_tiny_vlm(base.corpus_texts(items), arch="qwen2_5_vl", image_size=smoke.data.image_size).save(ckpt)

    tree = smoke.model_dump()
    tree.update(profile="paper-path")
    tree["data"].update(omnimedvqa_root=str(root), bench_dir=str(tmp_path / "unused"))
    tree["model"].update(path=str(ckpt), dir=str(tmp_path / "models"))
    for key in PAPER_KEYS:
        *parent, last = key.split(".")
        _get(tree, ".".join(parent))[last] = _get(paper, key)
    prof = tmp_path / "paper-path.yaml"
    prof.write_text(yaml.safe_dump(tree))
    monkeypatch.setenv("SAFEMED_OUTPUT_DIR", str(tmp_path / "out"))  # the notebooks' kernels inherit it

    assert reproduce.main(["--profile", str(prof), "--out", str(tmp_path / "runs")]) == 0
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [n["status"] for n in summary["notebooks"]] == ["ok"] * len(reproduce.find_notebooks())
    # the SFT baseline started from the checkpoint, not from a tiny base built here
    done = json.loads((tmp_path / "models" / "sft-nothink" / "done.json").read_text())
    assert done["key"]["parent"] == str(ckpt)
    assert not (tmp_path / "models" / "base" / "done.json").exists()  # no tiny base built (its evals may live there)
    assert not (tmp_path / "models" / "sft-think").exists()  # no rationales in a real OmniMedVQA copy
    report = (tmp_path / "out" / "results" / "REPORT.md").read_text()
    assert "paper-path" in report
