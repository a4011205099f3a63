"""The same profile and seed give identical results on CPU: benchmark, training and tables."""
import pandas as pd
import torch

from safemed_lib import evaluate, sft, synth, workbook


def _run(tmp_path, name):
    train, test = workbook.dataset(None, tmp_path / name / "bench", n_images=24, image_size=56, seed=0)
    vlm = sft.ensure_sft(tmp_path / name / "models", "think", train, image_size=56, steps=4, lr=3e-3,
                         batch_size=4, seed=0, save_every=2)
    df = evaluate.evaluate(vlm, test, prompt="think", image_size=56, batch_size=8, max_new_tokens=24)
    table = evaluate.accuracy_table(df, "modality")
    weights = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    root = synth.ensure_benchmark(tmp_path / name / "bench", 24, 0, 56)
    return df, table, weights, synth.benchmark_digest(root)


def test_same_seed_same_everything(tmp_path):
    df_a, table_a, w_a, digest_a = _run(tmp_path, "a")
    df_b, table_b, w_b, digest_b = _run(tmp_path, "b")
    assert digest_a == digest_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    pd.testing.assert_frame_equal(df_a, df_b)
    pd.testing.assert_frame_equal(table_a, table_b)
