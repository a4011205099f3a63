"""Stepwise fine-tuning: stage items as SFT data ("stepwise" or "plain") and the cached r2 model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import data
from .cases import StepwiseCase
from .items import stage_item, to_vqa

TRAIN_MODES = ("stepwise", "plain")


def training_items(cases: Sequence[StepwiseCase], mode: str) -> list[data.VQAItem]:
    """SFT items for every stage of every case: "stepwise" shows the earlier stages' gold answers as
    context, "plain" asks each stage alone (same images, questions and answers)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    ctx = "gold" if mode == "stepwise" else "none"
    return [to_vqa(stage_item(c, k, ctx)) for c in cases for k in range(len(c.stages))]


def ensure_r2_sft(models_dir: str | Path, mode: str, train_cases: Sequence[StepwiseCase], *,
                  start: Callable[[], object], start_id: str, steps: int, lr: float, batch_size: int,
                  image_size: int | None, seed: int = 0, log_every: int = 10, save_every: int = 100):
    """The model fine-tuned on the stage items of ``train_cases`` in ``mode``, trained once with
    ``sft.train_sft`` (no-think targets) and cached in ``<models_dir>/r2-<mode>``.

    ``start()`` returns a fresh copy of the starting model (e.g. the no-think SFT model) and
    ``start_id`` names it; the cache is reused only if its settings and ``start_id`` match, a
    matching unfinished run resumes, anything else is deleted and trained afresh."""
    import hashlib
    import shutil

    from .. import models, sft
    from ..paths import resolve

    items = training_items(train_cases, mode)
    out_dir = resolve(models_dir) / f"r2-{mode}"
    ids = "\n".join(sorted(it.question_id for it in items))
    texts = "\n".join(f"{it.question_id}|{it.question}|{it.options}|{it.answer}" for it in items)
    tag = {"start": start_id, "r2_mode": mode, "items_sha1": hashlib.sha1(texts.encode()).hexdigest()}
    want = {"variant": "nothink", "steps": int(steps), "lr": float(lr), "batch_size": int(batch_size),
            "image_size": image_size, "seed": int(seed), "n_train": len(items),
            "train_ids_sha1": hashlib.sha1(ids.encode()).hexdigest(), "tag": tag}
    done_file = out_dir / "done.json"
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        if all(done.get(k) == v for k, v in want.items()):
            return models.load_vlm(out_dir / done["model"])
        shutil.rmtree(out_dir)
    pointer = out_dir / "latest"  # an unfinished run (train_sft's checkpoint layout): resume it if it matches
    if pointer.is_file():
        state_file = out_dir / pointer.read_text().strip() / "state.pt"
        state = torch.load(state_file, map_location="cpu", weights_only=True) if state_file.is_file() else None
        if (state is None or state["step"] > steps
                or any(state["settings"].get(k) != v for k, v in want.items() if k != "steps")):
            shutil.rmtree(out_dir)
    return sft.train_sft(start(), items, variant="nothink", steps=steps, lr=lr, batch_size=batch_size,
                         image_size=image_size, out_dir=out_dir, seed=seed, log_every=log_every,
                         save_every=save_every, tag=tag)
