"""A toy task for the GRPO tests: the answer is the image's brightness, and a tiny model warmed up on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safemed_lib import data, models, sft
from safemed_lib.config import SFTRecipe

SIZE = 56


def toy_items(tmp: Path, n: int = 8, prefix: str = "q") -> list[data.VQAItem]:
    rng = np.random.default_rng(len(prefix))
    out = []
    for i in range(n):
        p = tmp / f"{prefix}im{i}.png"
        # the answer is visible: a bright image means A, a dark one B, mid grey C
        level = (200, 40, 120)[i % 3]
        arr = np.clip(level + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p)
        out.append(data.VQAItem(question_id=f"{prefix}{i}", dataset="toy", image_path=p,
                                question="How bright is the image?", options=["bright", "dark", "grey"],
                                answer="ABC"[i % 3], modality=data.MODALITIES[i % 2],
                                question_type="Modality Recognition"))
    return out


def toy_vlm(items: list[data.VQAItem], hidden_size: int = 64):
    """An untrained tiny model (seed 0) whose tokenizer is learnt on the toy items' texts."""
    torch.manual_seed(0)
    return models.build_tiny_vlm([f"{it.question} {' '.join(it.options)}" for it in items] * 5,
                                 image_size=SIZE, hidden_size=hidden_size)


def per_process_toy(out: Path, process_index: int):
    """For the multi-process workers: (the toy items written under ``out/data<k>``, one copy per
    process so that no two write the same file, an untrained tiny model of hidden size 32)."""
    data_dir = out / f"data{process_index}"
    data_dir.mkdir(parents=True, exist_ok=True)
    items = toy_items(data_dir)
    return items, toy_vlm(items, hidden_size=32)


def warm_toy_model(tmp: Path) -> tuple[list[data.VQAItem], Path]:
    """(the toy items, a tiny model given 40 answer-only SFT steps on them, saved under ``tmp/warm``)."""
    items = toy_items(tmp)
    vlm = sft.train_sft(toy_vlm(items), items, SFTRecipe(steps=40, lr=1e-2, batch_size=8), variant="nothink",
                        image_size=SIZE, out_dir=tmp / "sft", log_every=5)
    return items, vlm.save(tmp / "warm")
