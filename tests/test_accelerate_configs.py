"""The accelerate launch configs (configs/accelerate/*.yaml) as accelerate reads them: every file parses
into a launch, and FSDP's auto-wrap finds the layer classes of both Qwen2-VL and Qwen2.5-VL."""
from __future__ import annotations

from pathlib import Path

import pytest

from safemed_lib import models
from twoproc import launch_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_launch_config_is_read_by_accelerate(path):
    env = launch_env(path)
    assert env.get("ACCELERATE_MIXED_PRECISION") in {"no", "bf16"}, path.name


@pytest.mark.parametrize("arch,layers", [("qwen2_vl", {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"}),
                                         ("qwen2_5_vl", {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"})])
def test_fsdp_config_wraps_the_layers_of_both_architectures(arch, layers, monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    for k, v in launch_env(ROOT / "configs" / "accelerate" / "fsdp.yaml").items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as in each process
    vlm = models.build_tiny_vlm(["a b c d"] * 4, arch=arch, image_size=56, hidden_size=64)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, vlm.model)  # raised for Qwen2.5-VL with Qwen2-VL's names
    assert {type(m).__name__ for m in vlm.model.modules() if policy(m)} == layers
