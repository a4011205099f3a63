"""Distributed plumbing of ``grpo.train_grpo``: the KL reference copy, the final save, freeing the trainer.

- :func:`write_ref`: the starting weights saved as ``<out_dir>/ref`` (TRL loads its KL reference
  model from there), once per NODE (nodes may not share a file system) and atomically (written
  beside it, then renamed), so a crash mid-write never leaves a folder taken as complete.
- :func:`save_final`: the trained model through the trainer's own ``save_model``, called on EVERY
  process (under ZeRO-3 it gathers the 16-bit weights, under FSDP the full state dict), plus what
  ``models.load_vlm`` needs beside the weights (processor, ``safemed_vlm.json``).
- :func:`release`: drop a finished trainer (accelerator, optimizer, engine) and collect garbage,
  keeping only a few facts of the run, so notebooks can train many models in one kernel.
- :func:`zero3_enabled`: whether DeepSpeed ZeRO-3 is configured (transformers' global flag, set
  when a ``TrainingArguments`` is built under a ZeRO-3 launch).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
from pathlib import Path

import torch
from accelerate import PartialState
from transformers.trainer_utils import get_last_checkpoint

from .models.vlm import SETTINGS_FILE


def zero3_enabled() -> bool:
    """True when DeepSpeed ZeRO-3 is active: ``from_pretrained`` then partitions weights as they load."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def gathered(params: list):
    """DeepSpeed ZeRO-3's context in which ``params`` are whole on every process (a collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def sharded(accelerator) -> bool:
    """Whether the trainer shards the parameters themselves (ZeRO-3 or FSDP)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and getattr(plugin, "zero_stage", None) == 3
    return zero3 or getattr(accelerator.state, "fsdp_plugin", None) is not None


# --------------------------------------------------------------------------- the KL reference copy
def ref_complete(ref: Path) -> bool:
    """A complete saved VLM: ``VLM.save`` writes its settings file last."""
    return (ref / "config.json").is_file() and (ref / SETTINGS_FILE).is_file()


def _unique(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}-{socket.gethostname()}-{os.getpid()}")


def save_atomic(vlm, ref: Path) -> Path:
    """``vlm.save`` into a temporary folder beside ``ref``, then renamed to ``ref``. If another node
    (shared file system) renamed its copy first, that complete copy is kept."""
    ref = Path(ref)
    if ref.exists() and not ref_complete(ref):  # a half folder from a crash of an older version
        try:
            os.replace(ref, _unique(ref, "incomplete"))
        except FileNotFoundError:
            pass
    tmp = _unique(ref, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vlm.save(tmp)
        try:
            os.replace(tmp, ref)
        except OSError:
            if not ref_complete(ref):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


def write_ref(vlm, out_dir: Path) -> Path:
    """``out_dir/ref``: the starting weights, written once per node by its local main process
    (the node's other processes wait, then find it); kept if complete (resume never moves it).
    Under ZeRO-3 the weights may be partitioned already (zero.Init): every process then joins
    the gather of the full weights while the local main processes write."""
    out_dir = Path(out_dir)
    ref = out_dir / "ref"
    state = PartialState()
    if not zero3_enabled():
        with state.local_main_process_first():
            if state.is_local_main_process:
                _write_ref_once(vlm, out_dir, ref)
        return ref
    with gathered(list(vlm.model.parameters())):
        if state.is_local_main_process:
            _write_ref_once(vlm, out_dir, ref)
    state.wait_for_everyone()
    return ref


def _write_ref_once(vlm, out_dir: Path, ref: Path) -> None:
    if ref_complete(ref):
        return
    if get_last_checkpoint(str(out_dir)) is not None:
        raise RuntimeError(f"{out_dir} has checkpoints but no complete ref/ (the KL reference); remove "
                           "the run directory to start over")
    save_atomic(vlm, ref)


# --------------------------------------------------------------------------- the final model
def save_final(trainer, vlm, path: Path, lora: bool) -> Path:
    """Save the trained model to ``path`` so that ``models.load_vlm(path)`` reloads it. Call it on
    EVERY process: ``trainer.save_model`` gathers sharded weights (ZeRO-3 needs
    ``zero3_save_16bit_model: true``) and the main process writes. A LoRA run saves the merged
    weights (``vlm`` merged already), which needs unsharded weights."""
    path = Path(path)
    acc = trainer.accelerator
    if lora:
        if sharded(acc):
            raise RuntimeError("saving a LoRA run merged into its base weights is not supported under ZeRO-3/FSDP "
                               "(the base weights are sharded); use DDP or ZeRO-2 for LoRA runs")
        if acc.is_main_process:
            vlm.save(path)
    else:
        trainer.save_model(str(path))
        if trainer.args.should_save:
            if not any(path.glob("*.safetensors")):
                raise RuntimeError(f"{path}: the trainer saved no safetensors weights; under DeepSpeed ZeRO-3 set "
                                   "zero3_save_16bit_model: true in the accelerate config")
            vlm.processor.save_pretrained(path)
            (path / SETTINGS_FILE).write_text(json.dumps(vlm.settings(), indent=2) + "\n")
    acc.wait_for_everyone()
    return path


# --------------------------------------------------------------------------- after training
def train_info(trainer) -> dict:
    """The small facts of a finished run kept on the VLM (``vlm.train_info``) once the trainer is gone."""
    info = {"trainer": type(trainer).__name__, "global_step": trainer.state.global_step,
            "num_processes": trainer.accelerator.num_processes}
    for name in ("hook_calls", "attacked_images", "noisy_images"):
        if hasattr(trainer, name):
            value = getattr(trainer, name)
            info[name] = dict(value) if isinstance(value, dict) else value
    return info


def release(trainer) -> None:
    """Drop what the trainer's accelerator holds (engine, optimizer, dataloaders); the caller then
    drops its own reference to ``trainer`` and calls :func:`collect`."""
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None


def collect() -> None:
    """Garbage-collect, and return cached CUDA memory to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
