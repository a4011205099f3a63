"""What this environment is: versions, device, threads; and the torchvision guard."""
from __future__ import annotations

import importlib.util
import os
import platform
import sys

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
            "scipy", "statsmodels", "pandas", "matplotlib", "papermill", "ipywidgets")

TORCHVISION_REASON = (
    "torchvision must not be installed: the registry has no CPU build for torch 2.13.0; the CUDA build "
    "installs but fails at import ('operator torchvision::nms does not exist'), and then "
    "`from transformers import Qwen2VLForConditionalGeneration` fails too. Uninstall it "
    "(`.venv/bin/pip uninstall -y torchvision`)."
)


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_summary() -> dict[str, object]:
    """Device facts. ``cpu_model`` and ``torch_cpu_capability`` (the vector instruction set torch's CPU
    kernels use) are here because they change a CPU training run's floating-point results: the same
    code and seed are bit-identical on one machine and not across machines
    (docs/lab_notes.md, CPU determinism and threads)."""
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda_build": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        ]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def check() -> list[str]:
    """Problems that would break the workbook, as readable lines (empty when all is well)."""
    problems = []
    if torchvision_installed():
        problems.append(TORCHVISION_REASON)
    try:
        from transformers import Qwen2VLForConditionalGeneration  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on a broken environment
        problems.append(f"transformers cannot import Qwen2-VL: {type(e).__name__}: {e}")
    return problems
