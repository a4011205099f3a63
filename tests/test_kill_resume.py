"""A long evaluation killed with SIGKILL resumes without recomputing, losing or duplicating items."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from safemed_lib import base, data, evaluate, models, sft, synth
from safemed_lib.config import SFTRecipe

SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from safemed_lib import data, evaluate, models
    root, model_dir, records = sys.argv[1:4]
    items = list(data.load_omnimedvqa(root))
    vlm = models.load_vlm(model_dir)
    evaluate.evaluate(vlm, items, prompt="think", image_size=56, method="generate",
                      records_path=records, batch_size=1, max_new_tokens=12)
""")


def test_evaluation_resumes_after_kill_9(tmp_path):
    root = synth.make_benchmark(tmp_path / "bench", n_images=16, seed=0, size=56)
    items = list(data.load_omnimedvqa(root))
    model_dir = tmp_path / "model"
    models.build_tiny_vlm(base.corpus_texts(items), seed=0, image_size=56).save(model_dir)
    records = tmp_path / "eval.jsonl"

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(model_dir), str(records)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    assert 3 <= len(before) < len(items)

    vlm = models.load_vlm(model_dir)
    seen = []
    real_generate = vlm.generate
    vlm.generate = lambda images, batch, **kw: (seen.extend(it.question_id for it in batch),
                                                real_generate(images, batch, **kw))[1]
    df = evaluate.evaluate(vlm, items, prompt="think", image_size=56, method="generate", records_path=records,
                           batch_size=4, max_new_tokens=12)
    keys = [json.loads(line)["key"] for line in records.read_text().splitlines()]
    assert len(df) == len(items) and list(df["question_id"]) == [it.question_id for it in items]
    assert len(keys) == len(set(keys)) == len(items)  # nothing duplicated, nothing lost
    assert not set(seen) & {r["key"] for r in before}  # finished items were not recomputed
    assert len(seen) == len(items) - len(before)


TRAIN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from safemed_lib import data, models, sft
    from safemed_lib.config import SFTRecipe
    root, base, out, steps = sys.argv[1:5]
    items = list(data.load_omnimedvqa(root))
    sft.train_sft(models.load_vlm(base), items, SFTRecipe(steps=int(steps), lr=3e-3, batch_size=4),
                  variant="nothink", image_size=56, out_dir=out, seed=0, log_every=1, save_every=1)
""")


@pytest.mark.slow  # make test runs it; the fast tier (make unit) does not
def test_training_resumes_after_kill_9_to_the_same_weights(tmp_path):
    import torch

    root = synth.make_benchmark(tmp_path / "bench", n_images=16, seed=0, size=56)
    items = list(data.load_omnimedvqa(root))
    base_model = tmp_path / "base"
    models.build_tiny_vlm(base.corpus_texts(items), seed=0, image_size=56).save(base_model)
    steps, out = 40, tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(root), str(base_model), str(out), str(steps)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "ckpt-000003").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / sft.RUN_FILE).exists()

    recipe = SFTRecipe(steps=steps, lr=3e-3, batch_size=4)
    kw = dict(variant="nothink", image_size=56, seed=0, log_every=1, save_every=1)
    resumed = sft.train_sft(models.load_vlm(base_model), items, recipe, out_dir=out, **kw)
    assert sft.read_run(out)["steps"] == steps
    straight = sft.train_sft(models.load_vlm(base_model), items, recipe, out_dir=tmp_path / "straight", **kw)
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [int(line.split(",")[0]) for line in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, steps + 1))  # every step logged once: none lost, none repeated
