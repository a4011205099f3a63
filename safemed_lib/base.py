"""The tiny base model: a Qwen2-VL built here, given what pretraining gives a real one, never shown a question.

The embedded default has no checkpoint to start from, so the base is built (``models.build_tiny_vlm``:
a byte-level BPE tokenizer trained on :func:`corpus_texts`), given in-context copying
(``pretrain.copy_pretrain``, random token sequences) and a vision tower that says what an image
shows (``pretrain.vision_pretrain`` on the training images' scene attributes and lesion quadrants,
plus a second generated set of its own, :func:`pretrain_items`). It never sees a test image, a
question's answer or an answer letter. :func:`build` does it into a directory; ``zoo`` caches it
as the model named ``base``. The recipe is ``config.TinyBase``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import data, models, pretrain, prompts, runs, synth
from .records import atomic_write_text
from .targets import benchmark_root, scenes_for, think_rationale


def corpus_texts(items: Sequence[data.VQAItem]) -> list[str]:
    """The texts the tiny model's tokenizer is trained on: each item's problem (question and
    options, as the prompt shows them) and, on the embedded benchmark, its think rationale."""
    texts = [prompts.format_problem(it) for it in items]
    if items and benchmark_root(items[0]) is not None:
        texts += [think_rationale(it, sc) for it, sc in zip(items, scenes_for(items))]
    return texts


def plan(items: Sequence[data.VQAItem], tiny, *, image_size: int, seed: int) -> dict:
    """Everything the base depends on (its cache key): the recipe, the tokenizer corpus and, for
    vision pretraining, the benchmark it reads (vision pretraining needs the embedded benchmark's
    scenes: without them its steps are 0)."""
    items = list(items)
    recipe = tiny.model_dump()
    scenes = bool(items) and benchmark_root(items[0]) is not None
    if not scenes:
        recipe["vision_steps"] = 0
    out = {"kind": "tiny-base", "recipe": recipe, "image_size": image_size, "seed": seed,
           "corpus": runs.fingerprint(corpus_texts(items))}
    if scenes and recipe["vision_steps"] and recipe["pretrain_images"]:
        bench = synth.read_stamp(benchmark_root(items[0]))
        if bench:
            out["pretrain_images"] = {"n_images": recipe["pretrain_images"] * bench["n_images"],
                                      "seed": bench["seed"] + recipe["pretrain_seed_offset"], "size": bench["size"]}
    return out


def pretrain_items(folder: str | Path, spec: dict) -> list[data.VQAItem]:
    """The vision pretraining's own images (``plan``'s ``pretrain_images``): a generated set under
    ``folder``, made once; only their images and scenes are used."""
    root = synth.ensure_benchmark(folder, n_images=spec["n_images"], seed=spec["seed"], size=spec["size"])
    return list(data.load_omnimedvqa(root, strict=True))


def _vision_pretrain(vlm, items, steps: int, image_size: int, seed: int, position_weight: float) -> list[dict]:
    """``pretrain.vision_pretrain`` on the distinct images of ``items`` with their scenes' labels and
    lesion quadrants, and the per-token position loss."""
    first = {}
    for it in items:
        first.setdefault(str(it.image_path), it)
    items = [first[k] for k in sorted(first)]
    scenes = scenes_for(items)
    labels = [pretrain.scene_labels(sc) for sc in scenes]
    where = torch.tensor([pretrain.scene_quadrants(sc) for sc in scenes])
    return pretrain.vision_pretrain(vlm, data.load_images(items, size=image_size), labels, steps, seed=seed,
                                    where=where, position_weight=position_weight)


def build(items: Sequence[data.VQAItem], tiny, *, image_size: int, seed: int, out_dir: str | Path,
          extra_dir: str | Path | None = None) -> dict:
    """Build the tiny base into ``out_dir/model`` (tokenizer and weights) with the recipe ``tiny``
    (``config.TinyBase``), pretraining logs beside it (``copy_log.json``, ``vision_log.json``);
    ``extra_dir``: where the vision pretraining's own images are generated (default
    ``out_dir/pretrain_images``). Returns the logs."""
    items = list(items)
    out_dir = Path(out_dir)
    p = plan(items, tiny, image_size=image_size, seed=seed)
    recipe = p["recipe"]
    vlm = models.build_tiny_vlm(corpus_texts(items), seed=seed, hidden_size=recipe["hidden_size"],
                                layers=recipe["layers"], image_size=image_size)
    logs = {}
    if recipe["copy_steps"]:
        logs["copy"] = pretrain.copy_pretrain(vlm, recipe["copy_steps"], seed=seed)
    if recipe["vision_steps"]:
        extra = (pretrain_items(extra_dir or out_dir / "pretrain_images", p["pretrain_images"])
                 if "pretrain_images" in p else [])
        logs["vision"] = _vision_pretrain(vlm, items + extra, recipe["vision_steps"], image_size, seed,
                                          recipe["position_weight"])
    for name, log in logs.items():  # copy_log.json, vision_log.json
        atomic_write_text(out_dir / f"{name}_log.json", json.dumps(log, indent=1) + "\n")
    vlm.model.eval()
    vlm.save(out_dir / "model")
    return logs
