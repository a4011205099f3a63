"""Training precision: a bf16-loaded model trains on fp32 master weights (models.precision), so that
updates at the recipes' learning rates are not rounded away; SFT and GRPO alike."""
from __future__ import annotations

import pytest
import torch

from safemed_lib import grpo, models, sft
from safemed_lib.config import GRPORecipe, SFTRecipe
from toy import SIZE, warm_toy_model


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """(toy items, a warmed-up toy model saved in bfloat16, as real checkpoints are)."""
    tmp = tmp_path_factory.mktemp("prec")
    items, warm = warm_toy_model(tmp)
    vlm = models.load_vlm(warm, image_size=SIZE)
    vlm.model.to(torch.bfloat16)
    return items, vlm.save(tmp / "bf16")


def _params(vlm) -> dict[str, torch.Tensor]:
    return {k: p.detach().float().clone() for k, p in vlm.model.named_parameters()}


def _deltas_match(bf16_run, fp32_run, start) -> None:
    """The bf16-loaded run trained in float32 and moved its weights exactly as the float32 run did."""
    moved = 0
    for k, w0 in start.items():
        d32 = fp32_run[k] - w0
        torch.testing.assert_close(bf16_run[k] - w0, d32, rtol=0, atol=1e-9, msg=f"{k}: update lost or different")
        moved += int((d32 != 0).any())
    assert moved > len(start) // 2, f"only {moved} of {len(start)} tensors moved in the float32 run"


def test_master_weights_upcast_only_half_tensors_and_autocast_is_off_on_cpu():
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    assert models.master_weights(lin) == 2 and lin.weight.dtype == torch.float32
    assert models.master_weights(lin) == 0
    with models.autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_sft_on_a_bf16_checkpoint_keeps_updates_at_lr_1e_6(bf16_dir, tmp_path):
    items, path = bf16_dir
    a = models.load_vlm(path, image_size=SIZE)  # the checkpoint's dtype, as real checkpoints load
    assert a.model.dtype == torch.bfloat16
    b = models.load_vlm(path, dtype="float32", image_size=SIZE)
    start = _params(b)
    recipe = SFTRecipe(steps=3, lr=1e-6, batch_size=4)
    a = sft.train_sft(a, items, recipe, variant="nothink", image_size=SIZE, out_dir=tmp_path / "a")
    b = sft.train_sft(b, items, recipe, variant="nothink", image_size=SIZE, out_dir=tmp_path / "b")
    assert a.model.dtype == torch.float32
    _deltas_match(_params(a), _params(b), start)


def test_grpo_on_a_bf16_checkpoint_keeps_updates_at_lr_1e_6(bf16_dir, tmp_path):
    items, path = bf16_dir
    recipe = GRPORecipe(steps=1, lr=1e-6, num_generations=4, batch_size=8, beta=0.0, temperature=1.5,
                        max_completion_length=8)
    runs = {}
    for name, dtype in (("bf16", None), ("fp32", "float32")):
        vlm = models.load_vlm(path, dtype=dtype, image_size=SIZE)
        start = _params(vlm)
        runs[name] = grpo.train_grpo(vlm, items, recipe, mode="nothink", out_dir=tmp_path / name, seed=0)
    assert runs["bf16"].model.dtype == torch.float32
    _deltas_match(_params(runs["bf16"]), _params(runs["fp32"]), start)
