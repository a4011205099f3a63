"""Randomized smoothing (Cohen, Rosenfeld & Kolter, 2019) for any image classifier: CERTIFY, PREDICT, certified accuracy.

The smoothed classifier is g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I). ``certify`` and
``predict`` are Cohen et al.'s CERTIFY and PREDICT, written after locuslab/smoothing's ``core.py``:

* CERTIFY: n0 noisy samples select the top class cA; n fresh samples give a one-sided
  (1 - alpha) Clopper-Pearson lower bound pA on P(f(x + d) = cA); abstain if pA < 1/2, else
  certify the L2 radius sigma * PhiInverse(pA).
* PREDICT: n noisy samples; a two-sided binomial test on the top two counts; abstain if its
  p-value exceeds alpha.

Noise is added to the image in [0, 1] pixel space, i.e. *before* the model's normalization, and
the noisy image is **not clamped** back to [0, 1]: the guarantee holds for the Gaussian
distribution exactly, and clamping would change it. Our VLMs accept such inputs because their
differentiable preprocessing (``VLM.preprocess``) is an affine normalization plus a patch
reshuffle, both defined for any real pixel value; only base classifiers that truly require
[0, 1] inputs would have to clamp, and then they (not the certifier) must document it.

``classify(batch) -> LongTensor`` is the base classifier f: a (B, C, H, W) float batch in, B
class ids in [0, num_classes) out. For a VLM the classes are the answer options plus one class
for "no valid answer" (:mod:`safemed_lib.certify` builds such classifiers and certifies items).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

ABSTAIN = -1

Classifier = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the certifier

@dataclass(frozen=True)
class Certificate:
    """Everything CERTIFY computed for one input (``certify`` returns its first two fields)."""
    prediction: int             # the selected class, or ABSTAIN
    radius: float               # certified L2 radius in [0, 1] pixel units; 0.0 when abstaining
    p_lower: float              # one-sided (1 - alpha) Clopper-Pearson lower bound on pA
    counts_selection: np.ndarray  # class counts over the n0 selection samples
    counts_estimation: np.ndarray  # class counts over the estimation samples drawn (n, or fewer: early abstention)


def certify(classify: Classifier, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float,
            batch_size: int, num_classes: int, generator: torch.Generator | None = None) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: ``(class, radius)``, or ``(ABSTAIN, 0.0)``.

    With probability at least 1 - alpha over the noise, the returned class equals g(x) and g is
    constant on the L2 ball of the returned radius around ``x`` (a (C, H, W) image in [0, 1]).
    """
    c = certify_detail(classify, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                       num_classes=num_classes, generator=generator)
    return c.prediction, c.radius


def certify_detail(classify: Classifier | None, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                   batch_size: int, num_classes: int, generator: torch.Generator | None = None,
                   sampler: Callable[..., np.ndarray] | None = None, early_abstain: bool = True) -> Certificate:
    """CERTIFY, returning the bound and the counts as well (for records and tables).

    ``sampler(x, num, sigma=, batch_size=, num_classes=, generator=)`` replaces
    ``sample_counts(classify, ...)`` when given: class counts of ``num`` i.i.d. draws of
    f(x + N(0, sigma^2 I)), however they are computed (e.g. ``models.OptionScorer.counts`` draws the
    noise where the model first meets it); the guarantee needs only that distribution.

    ``early_abstain``: the n estimation samples are drawn ``batch_size`` at a time (the same draws as
    one call), and CERTIFY stops as soon as the selected class could no longer reach the count a
    certificate needs (``min_count``) even if every remaining draw were that class. The answer is
    then ABSTAIN, exactly what the full run would return (the bound only grows with the count), so
    the guarantee is untouched and fewer samples are spent; ``p_lower`` is then the bound at that
    best case (still below 1/2) and ``counts_estimation`` sums to the draws made."""
    _check(x, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes, n0=n0)
    if sampler is None:
        if classify is None:
            raise ValueError("certify_detail needs classify or sampler")
        sampler = lambda x_, num, **kw: sample_counts(classify, x_, num, **kw)  # noqa: E731
    kw = dict(sigma=sigma, batch_size=batch_size, num_classes=num_classes, generator=generator)
    counts_selection = _counts(sampler(x, n0, **kw), n0, num_classes)
    c_a = int(counts_selection.argmax())
    need, counts_estimation, drawn = min_count(n, alpha), np.zeros(num_classes, dtype=np.int64), 0
    while drawn < n:
        b = n - drawn if not early_abstain else min(batch_size, n - drawn)
        counts_estimation += _counts(sampler(x, b, **kw), b, num_classes)
        drawn += b
        if counts_estimation[c_a] + (n - drawn) < need:
            break
    p_lower = lower_confidence_bound(int(counts_estimation[c_a]) + n - drawn, n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, counts_selection, counts_estimation)
    return Certificate(c_a, float(sigma * norm.ppf(p_lower)), p_lower, counts_selection, counts_estimation)


def predict(classify: Classifier | None, x: torch.Tensor, *, sigma: float, n: int, alpha: float,
            batch_size: int, num_classes: int, generator: torch.Generator | None = None,
            sampler: Callable[..., np.ndarray] | None = None) -> int:
    """Cohen et al.'s PREDICT: g(x), or ABSTAIN.

    With probability at least 1 - alpha the returned class (when not ABSTAIN) equals g(x). The
    top two counts go through a two-sided binomial test (p = 1/2); abstain if its p-value > alpha.
    ``sampler``: as in ``certify_detail``.
    """
    _check(x, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes)
    if sampler is None:
        if classify is None:
            raise ValueError("predict needs classify or sampler")
        sampler = lambda x_, num, **kw: sample_counts(classify, x_, num, **kw)  # noqa: E731
    counts = _counts(sampler(x, n, sigma=sigma, batch_size=batch_size, num_classes=num_classes, generator=generator),
                     n, num_classes)
    return predict_from_counts(counts, alpha)


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision from the class counts of n noisy samples: the top class, or ABSTAIN when a
    two-sided binomial test of the top two counts (p = 1/2) has a p-value above alpha."""
    counts = np.asarray(counts)
    top2 = np.argsort(-counts, kind="stable")[:2]
    count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
    if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2[0])


def sample_counts(classify: Classifier, x: torch.Tensor, num: int, *, sigma: float, batch_size: int,
                  num_classes: int, generator: torch.Generator | None = None) -> np.ndarray:
    """Class counts of ``classify`` over ``num`` draws of x + N(0, sigma^2 I), in batches.

    The noise comes from ``generator`` (on x's device) when given, so a seeded generator makes the
    counts reproducible. The noisy images are not clamped (see the module docstring).
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            b = min(batch_size, remaining)
            remaining -= b
            batch = x.unsqueeze(0).expand(b, *x.shape)
            noise = torch.randn(batch.shape, generator=generator, device=x.device, dtype=x.dtype)
            ids = classify(batch + sigma * noise)
            counts += _count(ids, b, num_classes)
    return counts


def min_count(n: int, alpha: float) -> int:
    """The smallest count k of n with a one-sided (1 - alpha) Clopper-Pearson lower bound >= 1/2:
    the fewest draws of the selected class that let CERTIFY certify (n + 1 if none can)."""
    lo, hi = 0, n + 1          # lower_confidence_bound grows with k: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= n and lower_confidence_bound(mid, n, alpha) >= 0.5:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _counts(counts, num: int, num_classes: int) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.shape != (num_classes,) or counts.sum() != num or (counts < 0).any():
        raise ValueError(f"the sampler must return {num_classes} non-negative class counts summing to {num}, "
                         f"got {counts.tolist()}")
    return counts.astype(np.int64)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion n_a / n."""
    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n estimation samples: all n agree, so
    pA = alpha^(1/n) and R = sigma * PhiInverse(alpha^(1/n)) (1.50 sigma at n=100, 2.46 sigma at
    n=1,000, 3.81 sigma at n=100,000 for alpha=0.001)."""
    _check(None, sigma=sigma, n=n, alpha=alpha)
    return float(sigma * norm.ppf(lower_confidence_bound(n, n, alpha)))


def _count(ids: torch.Tensor, b: int, num_classes: int) -> np.ndarray:
    ids = torch.as_tensor(ids)
    if ids.shape != (b,) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"classify must return {b} integer class ids (shape ({b},)), "
                         f"got dtype {ids.dtype} and shape {tuple(ids.shape)}")
    ids = ids.detach().to("cpu", torch.int64)
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.numel():
        raise ValueError(f"classify returned class id {int(bad[0])} outside [0, num_classes={num_classes})")
    return torch.bincount(ids, minlength=num_classes).numpy()


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(x, *, sigma, n, alpha, batch_size=1, num_classes=2, n0=1) -> None:
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (_is_int(n0) and n0 >= 1):
        raise ValueError(f"n0 (selection samples) must be an integer >= 1, got {n0!r}")
    if not (_is_int(n) and n >= 1):
        raise ValueError(f"n (estimation samples) must be an integer >= 1, got {n!r}")
    if not (_is_real(alpha) and 0 < alpha < 1):
        raise ValueError(f"alpha must lie in the open interval (0, 1), got {alpha!r}")
    if not (_is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (_is_int(num_classes) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point()):
        raise ValueError("x must be one float image of shape (C, H, W) in [0, 1], got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")


# ----------------------------------------------------------------------------- attacking the smoothed classifier

def smooth_adv(log_probs: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, label: int, *, sigma: float,
               radius: float, steps: int = 10, m: int = 8, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salman et al.'s (2019) SmoothAdv PGD against the smoothed classifier: an image within L2 ``radius``
    of x (clamped to [0, 1]) that raises -log of the noise-averaged probability of ``label``.

    ``log_probs(batch) -> (B, classes)`` is the base classifier's differentiable log-probabilities.
    Each step averages softmax probabilities over ``m`` fresh Gaussian draws (sigma), takes a
    normalized L2 gradient step of 2.5 radius / steps and projects back onto the ball. A certificate
    of radius >= ``radius`` says the smoothed prediction cannot change on that ball, so what this
    attack finds is a check of soundness (and of the sampling), not a way around it.
    """
    if not (radius > 0 and steps >= 1 and m >= 1):
        raise ValueError(f"smooth_adv needs radius > 0, steps >= 1, m >= 1; got {radius}, {steps}, {m}")
    step = 2.5 * radius / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        noise = torch.randn((m, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        lp = log_probs((x + delta).unsqueeze(0) + sigma * noise)[:, label]
        loss = -(torch.logsumexp(lp, 0) - math.log(m))      # -log mean_i p_label(x + delta + noise_i)
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + step * grad / grad.norm().clamp_min(1e-12)
            delta = delta * (radius / delta.norm()).clamp(max=1.0)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


# ----------------------------------------------------------------------------- certified accuracy

def certified_accuracy(predictions: Sequence[int], radii: Sequence[float], labels: Sequence[int],
                       radius_grid: Sequence[float]) -> np.ndarray:
    """Certified accuracy at each radius r of ``radius_grid``: the fraction of items predicted
    correctly with a certified radius >= r. Abstentions (ABSTAIN) count as wrong."""
    pred, rad, lab = (np.asarray(a) for a in (predictions, radii, labels))
    if not (pred.shape == rad.shape == lab.shape) or pred.ndim != 1:
        raise ValueError(f"predictions, radii and labels must be 1-D of one length, got shapes "
                         f"{pred.shape}, {rad.shape}, {lab.shape}")
    if pred.size == 0:
        raise ValueError("certified_accuracy needs at least one item")
    grid = np.asarray(radius_grid, dtype=float)
    correct = (pred == lab) & (pred != ABSTAIN)
    return np.array([float(np.mean(correct & (rad >= r))) for r in grid])


def certified_accuracy_curves(df: pd.DataFrame, radius_grid: Sequence[float],
                              by: str | Sequence[str] = "modality") -> pd.DataFrame:
    """Certified accuracy vs radius per group of ``by`` plus an "All" group, in long form.

    ``df`` has one row per item with columns ``pred``, ``label`` and ``radius`` (as written by
    ``certify_items``). Columns: the ``by`` columns, ``radius``, ``certified_accuracy`` (in [0, 1]),
    ``n`` (items in the group).
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, "pred", "label", "radius"] if c not in df.columns]
    if missing:
        raise ValueError(f"certified_accuracy_curves: the results have no column(s) {missing}")
    groups = [(k if isinstance(k, tuple) else (k,), g) for k, g in df.groupby(by, sort=True)]
    groups.append((("All",) * len(by), df))
    rows = []
    for key, g in groups:
        acc = certified_accuracy(g["pred"], g["radius"], g["label"], radius_grid)
        rows += [{**dict(zip(by, key)), "radius": float(r), "certified_accuracy": float(a), "n": len(g)}
                 for r, a in zip(radius_grid, acc)]
    return pd.DataFrame(rows)


def certified_summary(df: pd.DataFrame, radii: Sequence[float] = (0.25, 0.5, 1.0),
                      by: str | Sequence[str] = "modality") -> pd.DataFrame:
    """Per group of ``by`` (plus "All"), in percent: the smoothed classifier's clean accuracy
    (certified accuracy at radius 0, i.e. CERTIFY's class is right), the abstain rate, the rate of
    "no valid answer" as CERTIFY's class (column ``n_options`` holds each item's option count),
    the noise-free base classifier's accuracy, and the certified accuracy at each of ``radii``."""
    grid = [0.0, *radii]
    curves = certified_accuracy_curves(df, grid, by=by)
    by = [by] if isinstance(by, str) else list(by)
    wide = curves.pivot_table(index=by, columns="radius", values="certified_accuracy", sort=False) * 100
    wide.columns = ["smoothed_clean_acc" if r == 0 else f"cert_acc@{r:g}" for r in wide.columns]
    keys = [k if isinstance(k, tuple) else (k,) for k in wide.index]
    extra = []
    for key in keys:
        g = df if key[0] == "All" else df[np.logical_and.reduce([df[c] == v for c, v in zip(by, key)])]
        extra.append({"n": len(g), "abstain": 100.0 * float((g["pred"] == ABSTAIN).mean()),
                      "no_answer": 100.0 * float((g["pred"] == g["n_options"]).mean()),
                      "base_acc": 100.0 * float((g["base_pred"] == g["label"]).mean())})
    out = pd.concat([pd.DataFrame(extra, index=wide.index), wide], axis=1)
    return out
