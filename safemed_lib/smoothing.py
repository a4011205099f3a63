"""Randomized smoothing (Cohen, Rosenfeld & Kolter, 2019) for image classifiers and VLM answers.

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
for "no valid answer" (see ``generation_classifier`` and ``logprob_classifier`` below).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from .attacks import item_seed, model_digest

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
    counts_estimation: np.ndarray  # class counts over the n estimation samples


def certify(classify: Classifier, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float,
            batch_size: int, num_classes: int, generator: torch.Generator | None = None) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY: ``(class, radius)``, or ``(ABSTAIN, 0.0)``.

    With probability at least 1 - alpha over the noise, the returned class equals g(x) and g is
    constant on the L2 ball of the returned radius around ``x`` (a (C, H, W) image in [0, 1]).
    """
    c = certify_detail(classify, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                       num_classes=num_classes, generator=generator)
    return c.prediction, c.radius


def certify_detail(classify: Classifier, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                   batch_size: int, num_classes: int, generator: torch.Generator | None = None) -> Certificate:
    """CERTIFY, returning the bound and the counts as well (for records and tables)."""
    _check(x, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes, n0=n0)
    counts_selection = sample_counts(classify, x, n0, sigma=sigma, batch_size=batch_size,
                                     num_classes=num_classes, generator=generator)
    c_a = int(counts_selection.argmax())
    counts_estimation = sample_counts(classify, x, n, sigma=sigma, batch_size=batch_size,
                                      num_classes=num_classes, generator=generator)
    p_lower = lower_confidence_bound(int(counts_estimation[c_a]), n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, counts_selection, counts_estimation)
    return Certificate(c_a, float(sigma * norm.ppf(p_lower)), p_lower, counts_selection, counts_estimation)


def predict(classify: Classifier, x: torch.Tensor, *, sigma: float, n: int, alpha: float,
            batch_size: int, num_classes: int, generator: torch.Generator | None = None) -> int:
    """Cohen et al.'s PREDICT: g(x), or ABSTAIN.

    With probability at least 1 - alpha the returned class (when not ABSTAIN) equals g(x). The
    top two counts go through a two-sided binomial test (p = 1/2); abstain if its p-value > alpha.
    """
    _check(x, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, num_classes=num_classes)
    counts = sample_counts(classify, x, n, sigma=sigma, batch_size=batch_size,
                           num_classes=num_classes, generator=generator)
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


# ----------------------------------------------------------------------------- VLM base classifiers

def generation_classifier(vlm, item, *, prompt: str = "nothink", max_new_tokens: int = 64,
                          batch_size: int | None = None) -> Classifier:
    """Base classifier f from greedy generation: the option index parsed from the answer
    (``prompts.parse_answer``), or ``len(item.options)`` for "no valid answer".

    Use ``num_classes = len(item.options) + 1``. Every image of a batch is asked ``item``'s question;
    ``batch_size`` caps how many go through ``vlm.generate`` at once (None: the whole batch).
    This is the faithful base classifier for every model (think or not): it classifies by what
    the model would actually answer.
    """
    from .prompts import LETTERS, parse_answer

    n_options = len(item.options)

    def classify(images: torch.Tensor) -> torch.Tensor:
        step = batch_size or len(images)
        ids = []
        for s in range(0, len(images), step):
            chunk = images[s:s + step]
            texts = vlm.generate(chunk, [item] * len(chunk), prompt=prompt, max_new_tokens=max_new_tokens)
            for text in texts:
                letter = parse_answer(text, n_options)
                ids.append(n_options if letter is None else LETTERS.index(letter))
        return torch.tensor(ids, dtype=torch.long)

    return classify


def logprob_classifier(vlm, item, *, prompt: str = "nothink") -> Classifier:
    """Base classifier f from one teacher-forced forward pass: the argmax over options of
    ``vlm.option_logprobs`` (the log-probability of each letter right after ``<answer>``).

    When it is valid: for answer-only models (``nothink``), whose greedy output starts with
    ``<answer>`` followed by the letter token (Med-R1's ``"<answer> C </answer>"``). Whenever the
    greedy output does start that way with one of the item's letters, that letter is the argmax
    over the whole vocabulary at that position, hence also over the options, so both classifiers
    agree. They differ when greedy decoding would not give a valid answer (another opening, a
    letter beyond the options, no closing tag): this path never yields the "no valid answer" class
    and picks the most likely letter instead, so it classifies by the model's preference, not by
    what it would emit. For chain-of-thought models it is not their classifier at all (they write
    ``<think>`` first and the answer depends on the reasoning), so
    certify think models with ``generation_classifier``. Class ids: 0..n_options-1 (use
    ``num_classes = len(item.options) + 1`` to share the class space with the generation path).
    """
    def classify(images: torch.Tensor) -> torch.Tensor:
        scores = vlm.option_logprobs(images, [item] * len(images), prompt=prompt)
        return torch.stack([s.detach().float().cpu().argmax() for s in scores]).long()

    return classify


def pick_items(items, n: int, by: str = "modality") -> list:
    """Up to ``n`` items taking one per group of ``by`` in turn (groups in first-seen order, items
    in their given order): a small certification set that covers every modality."""
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(getattr(it, by), []).append(it)
    out, queues = [], [list(g) for g in groups.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


METHODS = ("logprob", "generate")
# record fields that identify a certification run; one records file must not mix runs
_SETTINGS = ("sigma", "n0", "n", "alpha", "method", "prompt", "image_size", "seed", "max_new_tokens", "model")


def model_fingerprint(vlm) -> str:
    """A short id of a model's exact weights (``attacks.model_digest``): records of a certification
    run are only reused for the same weights."""
    return model_digest(vlm.model)


def item_generator(seed: int, question_id: str, device="cpu") -> torch.Generator:
    """A generator seeded from (seed, question_id) (``attacks.item_seed``): an item's noise does not
    depend on the order of items or on where an interrupted run resumed."""
    return torch.Generator(device=device).manual_seed(item_seed(seed, question_id))


def certify_items(vlm, items, *, sigma: float, n0: int, n: int, alpha: float, method: str = "logprob",
                  prompt: str = "nothink", image_size: int | None, records_path=None, batch_size: int = 32,
                  seed: int = 0, max_new_tokens: int = 64, model_id: str | None = None,
                  desc: str | None = None) -> pd.DataFrame:
    """CERTIFY every item with the VLM as base classifier; one row per item, in ``items``' order.

    ``method``: "logprob" (``logprob_classifier``, answer-only models) or "generate"
    (``generation_classifier``). Classes: option indices 0..k-1, k = "no valid answer"; pred is
    ABSTAIN (-1) when CERTIFY abstains. With ``records_path`` each finished item is appended to a
    ``Records`` file (key = question_id), so a killed run resumes without recomputing or
    duplicating items; records written with other settings (or another ``model_id``, e.g.
    ``model_fingerprint(vlm)``) are an error. Columns: key,
    question_id, dataset, modality, question_type, n_options, answer, label, pred, pred_letter,
    radius, p_lower, abstain, correct, base_pred (noise-free), counts_selection,
    counts_estimation, seconds, and the settings.
    """
    from . import data
    from .prompts import LETTERS
    from .records import Records
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check(None, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, n0=n0)
    items = list(items)
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("certify_items: items have duplicate question_ids; records are keyed by them")
    settings = {"sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "method": method,
                "prompt": prompt, "image_size": image_size, "seed": seed,
                "max_new_tokens": max_new_tokens if method == "generate" else None, "model": model_id}
    records = Records(records_path) if records_path is not None else None
    rows = records.load_run({k: settings[k] for k in _SETTINGS}) if records is not None else {}
    device = getattr(vlm, "device", "cpu")
    vlm.model.eval()
    todo = [it for it in items if it.question_id not in rows]
    for it in tqdm(todo, desc=desc or f"certify sigma={sigma}", leave=False):
        t0 = time.perf_counter()
        k = len(it.options)
        x = data.load_images([it], size=image_size)[0].to(device)
        if method == "logprob":
            classify = logprob_classifier(vlm, it, prompt=prompt)
        else:
            classify = generation_classifier(vlm, it, prompt=prompt, max_new_tokens=max_new_tokens)
        with torch.no_grad():
            base_pred = int(classify(x.unsqueeze(0))[0])
        c = certify_detail(classify, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                           num_classes=k + 1, generator=item_generator(seed, it.question_id, device))
        label = LETTERS.index(it.answer)
        row = {"key": it.question_id, "question_id": it.question_id, "dataset": it.dataset,
               "modality": it.modality, "question_type": it.question_type, "n_options": k,
               "answer": it.answer, "label": label, "pred": c.prediction,
               "pred_letter": LETTERS[c.prediction] if 0 <= c.prediction < k else None,
               "radius": c.radius, "p_lower": c.p_lower, "abstain": c.prediction == ABSTAIN,
               "correct": c.prediction == label, "base_pred": base_pred,
               "counts_selection": c.counts_selection.tolist(),
               "counts_estimation": c.counts_estimation.tolist(),
               "seconds": time.perf_counter() - t0, **settings}
        if records is not None:
            records.append(row)
        rows[it.question_id] = row
    return pd.DataFrame([rows[q] for q in ids])
