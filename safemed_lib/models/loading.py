"""Loading a ``VLM`` from a directory: what ``VLM.save`` wrote or a real Qwen2-VL / Qwen2.5-VL checkpoint.

Safetensors weights only, never remote code; the processor is built explicitly (never via
``AutoProcessor``); an optional PEFT LoRA adapter is attached or loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .processor import CHAT_TEMPLATE, image_only_processor
from .vlm import ARCHS, SETTINGS_FILE, VLM, _model_class


def _read_chat_template(path: Path, tokenizer) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _check_checkpoint(path: Path) -> str:
    """The checkpoint's arch, or a clear error on anything else."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    files = sorted(p.name for p in path.iterdir())
    cfg_file = path / "config.json"
    if not cfg_file.is_file() and (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} holds a PEFT LoRA adapter, not a model: load it with "
                         f"load_vlm(<base model dir>, lora={str(path)!r})")
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a supported checkpoint: no config.json (found: {files or 'nothing'})")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if model_type not in ARCHS:
        raise ValueError(f"{path}: config.json model_type is {model_type!r}; supported: {ARCHS}")
    if not any(name.endswith(".safetensors") for name in files):
        other = [n for n in files if re.search(r"\.(bin|pt|pth|ckpt)$", n)]
        raise ValueError(f"{path}: no .safetensors weights (found {other or files}); only safetensors "
                         f"checkpoints are loaded (pickled .bin/.pt weights are refused)")
    return model_type


def load_vlm(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
             lora: dict | str | Path | None = None, image_size: int | None = None,
             attn_implementation: str | None = None) -> VLM:
    """Load what ``VLM.save`` wrote, or a real Qwen2-VL / Qwen2.5-VL checkpoint directory.

    Requires ``config.json`` with model_type "qwen2_vl" or "qwen2_5_vl" and safetensors weights;
    never runs remote code. The processor is built explicitly (tokenizer + the PIL image processor
    from the directory's image-processor config + chat template), never via ``AutoProcessor``.
    ``dtype``: e.g. torch.float32 / "bfloat16" (default: the checkpoint's). ``lora``: a dict of
    ``peft.LoraConfig`` arguments to attach a new adapter, or the path of a saved adapter.
    ``image_size`` overrides the saved side (real checkpoints have none recorded).
    ``attn_implementation``: "eager", "sdpa" or "flash_attention_2" (needs the flash-attn package and
    a CUDA device); default: transformers' choice (sdpa where the model supports it).
    ``device``: default ``$SAFEMED_DEVICE`` (the profile's ``device``, which ``safemed_lib.reproduce``
    exports to the notebooks' kernels: "cuda" on the paper profile), else where the weights load (CPU).
    """
    import os

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    arch = _check_checkpoint(path)
    settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    ip_files = [f for f in ("preprocessor_config.json", "processor_config.json") if (path / f).is_file()]
    if not ip_files:
        raise ValueError(f"{path}: no preprocessor_config.json / processor_config.json (image processor settings)")
    ip = Qwen2VLImageProcessorPil(**_image_processor_kwargs(path / ip_files[0]))
    processor = image_only_processor(ip, tokenizer, _read_chat_template(path, tokenizer) or CHAT_TEMPLATE)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    attn = {} if attn_implementation is None else {"attn_implementation": _check_attn(attn_implementation)}
    model = _model_class(arch).from_pretrained(path, dtype=dtype or "auto", use_safetensors=True,
                                                trust_remote_code=False, **attn)
    model.eval()
    device = device or os.environ.get("SAFEMED_DEVICE") or None
    if device is not None:
        model.to(device)
    vlm = VLM(model, processor, arch=arch, image_size=image_size or settings.get("image_size"))
    if isinstance(lora, dict):
        vlm.add_lora(**lora)
    elif lora is not None:
        from peft import PeftModel

        vlm.model = PeftModel.from_pretrained(vlm.model, str(lora), is_trainable=False)
    return vlm


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _check_attn(name: str) -> str:
    """``name`` if this installation can run it, else a clear error."""
    import importlib.util

    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package, which is not "
                         "installed (pip install flash-attn on a CUDA machine), or use 'sdpa'")
    return name


_IP_KEYS = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
            "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "rescale_factor",
            "do_convert_rgb", "resample")


def _image_processor_kwargs(cfg_file: Path) -> dict:
    """The PIL image processor's settings from a (pre)processor config, whichever class wrote it."""
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("image_processor", cfg)  # processor_config.json nests it
    kwargs = {k: cfg[k] for k in _IP_KEYS if k in cfg}
    size = kwargs.get("size")
    if isinstance(size, dict) and not {"shortest_edge", "longest_edge"} <= set(size):
        kwargs.pop("size")  # e.g. {"min_pixels":..., "max_pixels":...} from old configs
        kwargs.setdefault("min_pixels", size.get("min_pixels", 56 * 56))
        kwargs.setdefault("max_pixels", size.get("max_pixels", 28 * 28 * 1280))
    return kwargs
