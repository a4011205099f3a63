"""Gaussian-noise GRPO (Cohen et al.'s base-classifier training, inside GRPO's rollouts).

:class:`NoisyGRPOTrainer` (used by ``grpo.train_grpo`` when ``recipe.noise_sigma > 0``; AT-GRPO's
trainer derives from it): every question of a generation batch gets one draw d ~ N(0, sigma^2 I) on
its image's pixels in [0, 1], not clamped and not rounded, which is the law randomized smoothing
certifies with. A rollout's generation, its reward and its policy-gradient term all see the same
x + d. ``draw="rollout"`` (default): every rollout of a group has its own draw, so the group's
rewards estimate the smoothed classifier's chance of the right answer P_d(f(x + d) = y) and the
advantages push it up (the objective smoothing certifies); ``draw="group"``: one draw per question,
shared by its G rollouts (as AT-GRPO shares its adversarial image), so a group's rewards differ only
by sampling.

Why not simply hand TRL a noisy image: TRL's rows carry 8-bit PIL images, so the noise would be
clamped to [0, 1] and rounded. Instead the row's image is a copy tagged with a seed
(``image.info[SEED_KEY]``, a pure function of (seed, step, question id): the same on every process),
and while TRL builds its inputs (:meth:`NoisyGRPOTrainer._generate_and_score_completions`, both the
generation's and the scoring's processor calls) the processor's image processor is
:class:`NoiseImageProcessor`: it replaces the rows of a tagged image by ``vlm.preprocess(x + d)``,
the exact differentiable preprocessing (equal to the HF processor's on the model's grid), with d
drawn from the tag. Untagged images (evaluation, other callers) are left as the processor made them.
"""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from trl import GRPOTrainer

from . import data

SEED_KEY = "safemed_noise_seed"
DRAWS = ("rollout", "group")


def seed_of(*parts) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def tag(image, seed: int):
    """A copy of the PIL ``image`` that :class:`NoiseImageProcessor` will draw noise for from ``seed``."""
    out = image.copy()
    out.info[SEED_KEY] = int(seed)
    return out


def draw(shape, sigma: float, seed: int) -> torch.Tensor:
    """The noise of a tagged image: N(0, sigma^2 I) of ``shape`` from a CPU generator seeded with ``seed``."""
    return sigma * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _flat(images) -> list:
    if isinstance(images, (list, tuple)):
        return [im for sub in images for im in _flat(sub)]
    return [images]


class NoiseImageProcessor:
    """The processor's image processor, with smoothing noise on the images tagged by :func:`tag`.

    Calls the wrapped image processor, then for each tagged image replaces its rows of
    ``pixel_values`` (image after image, ``prod(image_grid_thw)`` rows each) by
    ``vlm.preprocess(x + d)``. Everything else is delegated to the wrapped processor."""

    def __init__(self, image_processor, vlm, sigma: float):
        if sigma <= 0:
            raise ValueError(f"NoiseImageProcessor: sigma must be > 0, got {sigma}")
        self.wrapped, self.vlm, self.sigma = image_processor, vlm, float(sigma)
        self.noisy_images = 0  # tagged images processed (for tests and logs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def __call__(self, images=None, *args, **kwargs):
        out = self.wrapped(images, *args, **kwargs)
        flat = _flat(images) if images is not None else []
        seeds = [getattr(im, "info", {}).get(SEED_KEY) for im in flat]
        if not any(s is not None for s in seeds):
            return out
        grid = torch.as_tensor(np.asarray(out["image_grid_thw"]))
        if len(grid) != len(flat):
            raise RuntimeError(f"NoiseImageProcessor: {len(flat)} images but {len(grid)} image grids; "
                               "the processor's layout is not one grid per image")
        pv = out["pixel_values"]
        rows = torch.as_tensor(np.asarray(pv)).clone()
        ends = grid.prod(dim=1).cumsum(0).tolist()
        for im, seed, end, g in zip(flat, seeds, ends, grid.prod(dim=1).tolist()):
            if seed is None:
                continue
            x = data.from_pil(im)
            noisy, _ = self.vlm.preprocess((x + draw(x.shape, self.sigma, seed))[None])
            if noisy.shape != (g, rows.shape[1]):
                raise RuntimeError(f"NoiseImageProcessor: the noisy image gives {tuple(noisy.shape)} rows, the "
                                   f"processor {g} x {rows.shape[1]}: the image is not on the model's grid")
            rows[end - g:end] = noisy.to(rows.dtype)
            self.noisy_images += 1
        out["pixel_values"] = rows if isinstance(pv, torch.Tensor) else rows.numpy().astype(np.asarray(pv).dtype)
        return out


class NoisyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose training rollouts see their images under Gaussian noise (module doc).

    Extra arguments: ``vlm`` (the model wrapper: its exact preprocessing makes the noisy rows),
    ``noise_sigma`` (pixels in [0, 1]; 0: no noise, the plain trainer), ``noise_draw`` ("rollout" or
    "group"), ``noise_seed``.
    Logged: ``noise/sigma`` and ``noise/images`` (rows of the generation batch whose image is noisy).
    Raises if TRL built a batch without calling the image processor (the noise would be lost)."""

    def __init__(self, *args, vlm, noise_sigma: float = 0.0, noise_draw: str = "rollout", noise_seed: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        if noise_draw not in DRAWS:
            raise ValueError(f"noise_draw must be one of {DRAWS}, got {noise_draw!r}")
        self.vlm, self.noise_sigma, self.noise_draw, self.noise_seed = vlm, float(noise_sigma), noise_draw, noise_seed
        self.noisy_images = 0

    def _generate_and_score_completions(self, inputs):
        if not (self.noise_sigma and self.model.training):
            return super()._generate_and_score_completions(inputs)
        tagged = [{**row, "image": tag(row["image"], seed)} for row, seed in zip(inputs, self.seeds(inputs))]
        self._log_metric("noise/sigma", self.noise_sigma)  # before TRL's hook, which flushes the metrics
        self._log_metric("noise/images", float(len(tagged)))
        with self._noisy_processor() as ip:
            out = super()._generate_and_score_completions(tagged)
        self.noisy_images += len(tagged)
        if not ip.noisy_images:
            raise RuntimeError("NoisyGRPOTrainer: TRL built this batch's pixels without the image processor "
                               "(trl upgrade?): the rollouts would have run on CLEAN images")
        return out

    def seeds(self, inputs: list[dict]) -> list[int]:
        """The noise seed of each row: (seed, step, question id), and with ``draw="rollout"`` also the
        process and the row's copy number among its question's rows."""
        step, seen, out = self.state.global_step, {}, []
        for row in inputs:
            q = row["question_id"]
            if self.noise_draw == "group":
                out.append(seed_of(self.noise_seed, step, q))
            else:
                k = seen[q] = seen.get(q, -1) + 1
                out.append(seed_of(self.noise_seed, step, q, self.accelerator.process_index, k))
        return out

    @contextlib.contextmanager
    def _noisy_processor(self):
        proc = self.processing_class
        ip = NoiseImageProcessor(proc.image_processor, self.vlm, self.noise_sigma)
        proc.image_processor = ip
        try:
            yield ip
        finally:
            proc.image_processor = ip.wrapped
