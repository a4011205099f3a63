import importlib.metadata

import torch

from safemed_lib import environment


def test_torchvision_is_not_installed():
    assert not environment.torchvision_installed(), environment.TORCHVISION_REASON


def test_torch_is_the_pinned_build():
    assert importlib.metadata.version("torch").startswith("2.13.0")


def test_environment_check_is_clean():
    assert environment.check() == []


def test_versions_and_device_summary():
    v = environment.versions()
    assert v["transformers"] != "not installed" and v["trl"] != "not installed"
    d = environment.device_summary()
    assert d["cpu_count"] >= 1 and d["torch_threads"] >= 1
    assert d["cpu_model"] and d["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
