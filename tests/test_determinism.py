"""The same profile and seed give identical results on CPU: benchmark, base, training and tables."""
import pandas as pd
import torch

from safemed_lib import config, dataset, evaluate, synth, zoo


def _run(tmp_path, name):
    cfg = config.load("smoke", {"model.dir": str(tmp_path / name / "models"),
                                "data.bench_dir": str(tmp_path / name / "bench"), "data.n_images": 24,
                                "data.image_size": 56, "seed": 0, "model.tiny.copy_steps": 20,
                                "model.tiny.vision_steps": 20, "model.tiny.pretrain_images": 1,
                                "sft.think.steps": 4, "sft.think.lr": 3e-3, "sft.think.batch_size": 4})
    _, test = dataset.splits(cfg)
    vlm = zoo.load("sft-think", cfg)
    df = evaluate.evaluate(vlm, test, prompt="think", image_size=56, batch_size=8, max_new_tokens=24)
    table = evaluate.accuracy_table(df, "modality")
    weights = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    root = synth.ensure_benchmark(tmp_path / name / "bench", 24, 0, 56)
    return df, table, weights, synth.benchmark_digest(root), zoo.fingerprint("sft-think", cfg)


def test_same_seed_same_everything(tmp_path):
    df_a, table_a, w_a, digest_a, key_a = _run(tmp_path, "a")
    df_b, table_b, w_b, digest_b, key_b = _run(tmp_path, "b")
    assert digest_a == digest_b
    assert key_a == key_b  # folders aside, the two runs are the same model to the cache
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    pd.testing.assert_frame_equal(df_a, df_b)
    pd.testing.assert_frame_equal(table_a, table_b)
