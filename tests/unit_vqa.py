"""A tiny VLM and three random-image questions, shared by the attack tests (test_attacks, test_robustness)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from safemed_lib import data, models

CORPUS = ["What imaging technique was used? A)CT scan, B)MRI, C)X-ray",
          "The image shows a round lesion in the upper left region, so the answer is B."] * 5


def tiny_vlm():
    return models.build_tiny_vlm(CORPUS, seed=0, image_size=56, hidden_size=64, vocab_size=600)


def vqa_items(root: Path):
    """(three questions on random 56x56 images under ``root``, their images as a tensor)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(path)
        items.append(data.VQAItem(question_id=f"q{i}", dataset="unit", image_path=path,
                                  question="What imaging technique was used?", options=["CT scan", "MRI", "X-ray"],
                                  answer="ABC"[i], modality="CT", question_type="Modality Recognition"))
    return items, data.load_images(items, size=56)
