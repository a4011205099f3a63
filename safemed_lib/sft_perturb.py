"""The training perturbations of SFT: Madry et al.'s PGD images (AT-SFT) and Gaussian noise (Cohen et al.).

``sft.train_sft`` takes ``adversarial`` (checked and completed by :func:`adversarial_settings`) and
``recipe.noise_sigma``; :func:`adversarial_images` and :func:`noisy` perturb one batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import attacks, data

ADV_DEFAULTS = {"eps": 8 / 255, "alpha": None, "steps": 5, "fraction": 0.5, "norm": "linf"}


def adversarial_settings(adversarial: dict | None) -> dict | None:
    """``train_sft``'s ``adversarial`` argument checked and completed: None, or a dict with
    ``eps`` (radius in [0,1] pixel units), ``alpha`` (step; None: ``attacks.default_alpha``),
    ``steps`` (PGD steps), ``fraction`` (share of each batch attacked) and ``norm``."""
    if adversarial is None:
        return None
    if not isinstance(adversarial, dict):
        raise TypeError(f"adversarial must be None or a dict, got {type(adversarial).__name__}")
    unknown = set(adversarial) - set(ADV_DEFAULTS)
    if unknown:
        raise ValueError(f"adversarial: unknown keys {sorted(unknown)}; known: {sorted(ADV_DEFAULTS)}")
    adv = {**ADV_DEFAULTS, **adversarial}
    if adv["norm"] not in attacks.NORMS:
        raise ValueError(f"adversarial.norm must be one of {attacks.NORMS}, got {adv['norm']!r}")
    if not adv["eps"] > 0:
        raise ValueError(f"adversarial.eps must be > 0, got {adv['eps']!r}")
    if int(adv["steps"]) != adv["steps"] or adv["steps"] < 1:
        raise ValueError(f"adversarial.steps must be an integer >= 1, got {adv['steps']!r}")
    if not 0 < adv["fraction"] <= 1:
        raise ValueError(f"adversarial.fraction must be in (0, 1], got {adv['fraction']!r}")
    if adv["alpha"] is None:
        adv["alpha"] = attacks.default_alpha(adv["eps"], int(adv["steps"]))
    if not adv["alpha"] > 0:
        raise ValueError(f"adversarial.alpha must be > 0, got {adv['alpha']!r}")
    return {"eps": float(adv["eps"]), "alpha": float(adv["alpha"]), "steps": int(adv["steps"]),
            "fraction": float(adv["fraction"]), "norm": adv["norm"]}


def adversarial_images(vlm, images: torch.Tensor, items: Sequence[data.VQAItem], targets: Sequence[str], *,
                       prompt: str, adversarial: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Madry et al.'s inner maximisation for one SFT batch: the first ``round(fraction * B)``
    images replaced by PGD images that ascend the batch's own SFT loss (``vlm.sequence_nll`` of
    its targets, the loss the step then descends), put on the 8-bit grid inside the ball. The
    model is in eval mode during the attack. Returns a new batch; ``images`` is not modified."""
    adv = adversarial_settings(adversarial)
    k = round(adv["fraction"] * len(items))
    if k == 0:
        return images
    items, targets = list(items)[:k], list(targets)[:k]
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        x_adv = attacks.pgd(lambda z: vlm.sequence_nll(z, items, targets, prompt=prompt), images[:k],
                            eps=adv["eps"], alpha=adv["alpha"], steps=adv["steps"], norm=adv["norm"],
                            generator=generator)
    finally:
        vlm.model.train(was_training)
    return torch.cat([attacks.round_8bit_toward(x_adv, images[:k]), images[k:]])


def noisy(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``images`` + N(0, sigma^2 I), not clamped: the noise randomized smoothing draws, so the base
    classifier learns under it (Cohen et al.'s training)."""
    return images + sigma * torch.randn(images.shape, generator=generator, device=images.device)
