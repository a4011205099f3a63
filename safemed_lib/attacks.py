"""Projected gradient descent (Madry et al. 2018) on raw [0,1] images, and its evaluation hook.

The core, :func:`pgd`, is model-agnostic: it takes any differentiable per-example loss on an
image batch in [0,1] and ascends it inside the eps-ball around the clean batch. Every iterate is
projected onto the ball and clamped to [0,1], so the result is a valid image:

    L-inf:  x <- clamp(Proj_inf(x + alpha * sign(g)), 0, 1)
    L2:     x <- clamp(Proj_2(x + alpha * g / ||g||_2), 0, 1)   (per example)

For a vision-language model the loss comes from :mod:`safemed_lib.objectives` (re-exported here):
the teacher-forced cross-entropy of the ground-truth answer through the model wrapper's exact
differentiable preprocessing (`VLM.sequence_nll`), never on the processor's normalized
`pixel_values` (the mistake of the public SafeMed-R1 fork), or the first token's NLL, or the
option-letter margin. :func:`pgd_perturb` wraps it as a `perturb(images, items)` hook for
`safemed_lib.evaluate.evaluate`, which then generates on the adversarial image, parses the answer
and compares it with the truth (the attack is judged end to end).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import torch

NORMS = ("linf", "l2")
LossFn = Callable[[torch.Tensor], torch.Tensor]


def _check(x: torch.Tensor, eps: float, alpha: float, steps: int, norm: str, restarts: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor image batch, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor in [0,1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    if x.numel() and (x.min().item() < 0.0 or x.max().item() > 1.0):
        raise ValueError(f"x must lie in [0,1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (the step size) must be > 0, got {alpha}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts}")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around x, then clamp to [0,1]. Since x is in [0,1], clamping
    only shrinks each |delta_i|, so the result stays inside the ball."""
    if norm == "linf":
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        factor = torch.clamp(eps / (_flat_norm(delta) + 1e-12), max=1.0)
        x_adv = x + delta * factor
    return x_adv.clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """Uniform in the L-inf ball (as in Madry et al.); for L2 uniform in the L2 ball
    (a Gaussian direction, radius eps * U^(1/d)). Clamped to [0,1]. ``generator`` may be a list
    with one generator per example (per-item seeds that do not depend on the batching)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator: got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([_random_start(x[i:i + 1], eps, norm, g) for i, g in enumerate(generator)])
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    else:
        d = x[0].numel()
        direction = torch.empty_like(x).normal_(generator=generator)
        direction = direction / (_flat_norm(direction) + 1e-12)
        u = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(generator=generator)
        radius = eps * u.pow(1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def _loss(loss_fn: LossFn, x_adv: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(x_adv)
    if not isinstance(loss, torch.Tensor) or loss.shape != (x_adv.shape[0],):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return one loss per example, shape ({x_adv.shape[0]},); got {shape}")
    return loss


def pgd(loss_fn: LossFn, x: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
        random_start: bool = True, generator: torch.Generator | Sequence[torch.Generator] | None = None,
        restarts: int = 1,
        return_trace: bool = False,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None):
    """Maximize ``loss_fn`` within the ``norm``-ball of radius ``eps`` around ``x``.

    Args:
        loss_fn: ``loss_fn(x_adv) -> (B,)`` per-example loss that the attack ascends. It must treat
            examples independently (e.g. a model in eval mode), because the gradient of the summed
            loss is used as every example's gradient.
        x: clean batch (B, ...) of floats in [0,1]. Not modified.
        eps: radius of the ball (>= 0), in [0,1] pixel units (e.g. 8/255 for L-inf).
        alpha: step size (> 0): the L-inf step is ``alpha * sign(grad)``; the L2 step moves
            ``alpha`` along the per-example normalized gradient.
        steps: number of gradient steps (>= 1).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform sample in the ball (clamped to [0,1]) instead of ``x``.
        generator: torch.Generator for the random start (deterministic attacks), or a list with
            one generator per example.
        restarts: independent random starts; per example the final iterate with the highest loss
            is kept (costs one extra forward per restart when ``restarts > 1``).
        return_trace: also return a (restarts, steps + 1, B) tensor of the loss at every iterate
            (entry t is the loss at iterate t; the last is the loss at the returned iterate of
            that restart; one extra forward per restart).
        callback: ``callback(restart, step, x_adv, loss)`` after each step's loss evaluation.

    Returns:
        The adversarial batch (detached, same shape/dtype as ``x``), or ``(x_adv, trace)``.
    """
    _check(x, eps, alpha, steps, norm, restarts)
    x = x.detach()
    best, best_loss, traces = None, None, []
    need_final = restarts > 1 or return_trace
    with torch.enable_grad():
        for r in range(restarts):
            x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
            trace = []
            for t in range(steps):
                x_adv.requires_grad_(True)
                loss = _loss(loss_fn, x_adv)
                (grad,) = torch.autograd.grad(loss.sum(), x_adv)
                trace.append(loss.detach())
                if callback is not None:
                    callback(r, t, x_adv.detach(), loss.detach())
                with torch.no_grad():
                    if norm == "linf":
                        x_adv = x_adv + alpha * grad.sign()
                    else:
                        x_adv = x_adv + alpha * grad / (_flat_norm(grad) + 1e-12)
                    x_adv = _project(x_adv, x, eps, norm)
            if need_final:
                with torch.no_grad():
                    final = _loss(loss_fn, x_adv).detach()
                trace.append(final)
                traces.append(torch.stack(trace))
                if best is None:
                    best, best_loss = x_adv, final
                else:
                    better = final > best_loss
                    best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                    best_loss = torch.where(better, final, best_loss)
            else:
                best = x_adv
    best = best.detach()
    return (best, torch.stack(traces)) if return_trace else best


def fgsm(loss_fn: LossFn, x: torch.Tensor, *, eps: float, norm: str = "linf") -> torch.Tensor:
    """The fast gradient (sign) method: one PGD step of size ``eps`` from ``x`` (no random start)."""
    return pgd(loss_fn, x, eps=eps, alpha=eps if eps > 0 else 1.0, steps=1, norm=norm, random_start=False)


def round_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round a [0,1] image batch to the 8-bit grid (what saving as PNG or passing as PIL does)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def round_8bit_toward(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Put ``x_adv`` on the 8-bit grid by rounding its perturbation toward zero (``x`` must be on
    the grid, as images read from PNG/JPEG are). Every |delta_i| shrinks, so the result stays in
    any L-inf or L2 ball around ``x`` that ``x_adv`` was in; with plain rounding an L2 attack could
    leave its ball by up to half a grey level per pixel."""
    delta = (x_adv - x) * 255.0
    delta = torch.sign(delta) * torch.floor(delta.abs() + 1e-3)  # 1e-3: 1.9999 grey levels count as 2
    return (torch.round(x * 255.0) + delta).clamp(0.0, 255.0) / 255.0


# --------------------------------------------------------------------------- the VLM objectives (objectives.py)
from .objectives import (ANSWER_FIRST, TARGETS, _resolve_target, answer_targets, attack_loss,  # noqa: E402,F401
                         first_token_loss, first_tokens, margin_loss, option_margin, reasoning_of, vlm_answer_loss)


def default_alpha(eps: float, steps: int) -> float:
    """Madry et al.'s step-size rule, 2.5 * eps / steps (2/255 for eps 8/255 with 10 steps)."""
    return 2.5 * eps / steps


def pgd_perturb(vlm, *, prompt: str, eps: float, alpha: float | None = None, steps: int = 10,
                norm: str = "linf", target: str = "auto", restarts: int = 1, random_start: bool = True,
                seed: int = 0, rounding: bool = True, clean_outputs: dict[str, str] | None = None,
                reduction: str = "sum", max_new_tokens: int = 256) -> Callable:
    """A ``perturb(images, items) -> (images, extras)`` hook for ``evaluate.evaluate``.

    Each batch is attacked with :func:`pgd` on :func:`attack_loss` for objective ``target``
    (``alpha`` defaults to :func:`default_alpha`). The random start of each item is drawn from its own generator seeded
    by ``(seed, question_id)``, so results do not depend on batching or on resuming. With
    ``rounding`` the adversarial image is put on the 8-bit grid (:func:`round_8bit_toward`: what
    saving it as PNG does, without leaving the ball); ``evaluate`` records ``rounded_8bit``.
    Extras per item: the attack settings, the target kind, the loss on the clean and on the final
    image, and the perturbation's L-inf and L2 size.
    """
    if alpha is None:
        alpha = default_alpha(eps, steps) if eps > 0 and isinstance(steps, int) and steps >= 1 else 1.0
    _check(torch.zeros(1, 1), eps, alpha, steps, norm, restarts)  # validate up front
    _resolve_target(target, prompt)
    settings = {"attack": "pgd", "attack_norm": norm, "attack_eps": float(eps), "attack_alpha": alpha,
                "attack_steps": steps, "attack_restarts": restarts, "attack_random_start": random_start,
                "attack_seed": seed}

    def perturb(images: torch.Tensor, items: Sequence):
        items = list(items)
        images = images.to(vlm.device, torch.float32)
        loss_fn, kinds = attack_loss(vlm, items, prompt=prompt, target=target, clean_images=images,
                                     clean_outputs=clean_outputs, reduction=reduction, max_new_tokens=max_new_tokens)
        if eps > 0:
            gens = [torch.Generator(device=images.device).manual_seed(item_seed(seed, it.question_id))
                    for it in items]
            x_adv = pgd(loss_fn, images, eps=eps, alpha=alpha, steps=steps, norm=norm,
                        random_start=random_start, generator=gens, restarts=restarts)
        else:
            x_adv = images.clone()
        if rounding:
            x_adv = round_8bit_toward(x_adv, images)
        with torch.no_grad():
            clean_loss, adv_loss = loss_fn(images), loss_fn(x_adv)
        delta = (x_adv - images).flatten(1)
        extras = [dict(settings, attack_target=k, attack_loss_clean=float(c), attack_loss_adv=float(a),
                       attack_linf=float(li), attack_l2=float(l2))
                  for k, c, a, li, l2 in zip(kinds, clean_loss, adv_loss, delta.abs().amax(1), delta.norm(dim=1))]
        return x_adv, extras

    return perturb


def item_seed(seed: int, question_id: str) -> int:
    """The random-start seed of one item: a function of (seed, question_id) only."""
    return (zlib.crc32(question_id.encode("utf-8")) + 1_000_003 * int(seed)) % (2 ** 63)
