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


def assert_gradient_is_the_derivative(loss_fn, x, *, h: float, rtol: float) -> None:
    """Finite differences of ``loss_fn`` along its normalised gradient at ``x`` match the gradient's
    norm, per example: the loss is differentiated end to end in raw [0, 1] pixel space."""
    import torch

    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(xr).sum(), xr)
    d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        fd = (loss_fn(x + h * d) - loss_fn(x - h * d)) / (2 * h)
    torch.testing.assert_close(fd, g.flatten(1).norm(dim=1), rtol=rtol, atol=1e-5)
