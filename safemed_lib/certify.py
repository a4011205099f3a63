"""Certifying a VLM's answer with randomized smoothing: base classifiers from a VLM, CERTIFY over items with records.

The classes of one question are its options plus "no valid answer". :func:`generation_classifier`
classifies by what the model would answer (greedy generation, every model); :func:`logprob_classifier`
by the option letters' log-probabilities after ``<answer>`` (one forward pass; answer-only models).
:func:`certify_items` runs ``smoothing.certify_detail`` (Cohen et al.'s CERTIFY) on each item with
noise seeded by (seed, question id), and writes one resumable record per item.
"""
from __future__ import annotations

import time

import pandas as pd
import torch

from .attacks import item_seed
from .smoothing import ABSTAIN, Classifier, _check, certify_detail


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
    Qwen2-VL models go through ``models.OptionScorer`` (the same log-probs to float rounding, computed
    once per question where they do not depend on the pixels).
    """
    from .models import option_scorer

    if option_scorer.supported(vlm):  # the same log-probs without the per-image repeats
        scorers = {}

        def fast(images: torch.Tensor) -> torch.Tensor:
            size = tuple(images.shape[-2:])
            if size not in scorers:
                scorers[size] = option_scorer.OptionScorer(vlm, item, prompt, size)
            return scorers[size].logprobs(images).detach().cpu().argmax(-1)
        return fast

    def classify(images: torch.Tensor) -> torch.Tensor:
        scores = vlm.option_logprobs(images, [item] * len(images), prompt=prompt)
        return torch.stack([s.detach().float().cpu().argmax() for s in scores]).long()

    return classify


def base_classifier(vlm, item, *, method: str, prompt: str, max_new_tokens: int = 64) -> Classifier:
    """The base classifier of ``method``: "logprob" (:func:`logprob_classifier`) or "generate"
    (:func:`generation_classifier`)."""
    if method == "logprob":
        return logprob_classifier(vlm, item, prompt=prompt)
    return generation_classifier(vlm, item, prompt=prompt, max_new_tokens=max_new_tokens)


def sampler(vlm, item, *, method: str, prompt: str, noise: str = "embedding", max_new_tokens: int = 64,
            image_size: int | None = None):
    """``(x, num, sigma=, batch_size=, num_classes=, generator=) -> class counts`` as ``certify_items``
    draws them: ``OptionScorer.counts`` on the fast path of a supported model with ``noise="embedding"``,
    else ``smoothing.sample_counts`` over ``base_classifier``."""
    return classifier_and_sampler(vlm, item, method=method, prompt=prompt, noise=noise,
                                  max_new_tokens=max_new_tokens, image_size=image_size)[1]


def classifier_and_sampler(vlm, item, *, method: str, prompt: str, noise: str = "embedding",
                           max_new_tokens: int = 64, image_size: int | None = None):
    """(``base_classifier``, :func:`sampler`) of one item, sharing one ``OptionScorer`` on the embedding path."""
    from .models import option_scorer
    from .smoothing import sample_counts

    if _embedding_noise(vlm, method, noise):
        scorer = option_scorer.OptionScorer(vlm, item, prompt, image_size)
        return (lambda images: scorer.logprobs(images).detach().cpu().argmax(-1)), scorer.counts
    classify = base_classifier(vlm, item, method=method, prompt=prompt, max_new_tokens=max_new_tokens)
    return classify, (lambda x, num, **kw: sample_counts(classify, x, num, **kw))


def _embedding_noise(vlm, method: str, noise: str) -> bool:
    from .models import option_scorer

    return method == "logprob" and noise == "embedding" and option_scorer.supported(vlm)


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
NOISE = ("embedding", "pixel")
# record fields that identify a certification run; one records file must not mix runs
_SETTINGS = ("sigma", "n0", "n", "alpha", "method", "prompt", "image_size", "seed", "max_new_tokens", "model", "noise")


def item_generator(seed: int, question_id: str, device="cpu") -> torch.Generator:
    """A generator seeded from (seed, question_id) (``attacks.item_seed``): an item's noise does not
    depend on the order of items or on where an interrupted run resumed."""
    return torch.Generator(device=device).manual_seed(item_seed(seed, question_id))


def certify_items(vlm, items, *, sigma: float, n0: int, n: int, alpha: float, method: str = "logprob",
                  prompt: str = "nothink", image_size: int | None, records_path=None, batch_size: int = 32,
                  seed: int = 0, max_new_tokens: int = 64, model_id: str | None = None,
                  desc: str | None = None, noise: str = "embedding") -> pd.DataFrame:
    """CERTIFY every item with the VLM as base classifier; one row per item, in ``items``' order.

    ``method``: "logprob" (``logprob_classifier``, answer-only models) or "generate"
    (``generation_classifier``). Classes: option indices 0..k-1, k = "no valid answer"; pred is
    ABSTAIN (-1) when CERTIFY abstains. ``noise="embedding"``: on the fast path of a model that
    ``models.option_scorer.supported``, the Gaussian noise is drawn in the patch embedding
    (``OptionScorer.counts``: the same distribution of outputs, far fewer draws); otherwise, and with
    ``"pixel"``, in pixel space (``smoothing.sample_counts``); column ``noise_drawn`` says which. With ``records_path`` each finished item is appended to a
    ``Records`` file (key = question_id), so a killed run resumes without recomputing or
    duplicating items; records written with other settings (or another ``model_id``, e.g.
    ``zoo.fingerprint``) are an error. Columns: key,
    question_id, dataset, modality, question_type, n_options, answer, label, pred, pred_letter,
    radius, p_lower, abstain, correct, base_pred (noise-free), counts_selection,
    counts_estimation, n_drawn (n, or fewer when CERTIFY abstained early), noise_drawn,
    seconds, and the settings.
    """
    from . import data
    from .prompts import LETTERS
    from .records import Records
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
    _check(None, sigma=sigma, n=n, alpha=alpha, batch_size=batch_size, n0=n0)
    items = list(items)
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("certify_items: items have duplicate question_ids; records are keyed by them")
    settings = {"sigma": float(sigma), "n0": n0, "n": n, "alpha": float(alpha), "method": method,
                "prompt": prompt, "image_size": image_size, "seed": seed,
                "max_new_tokens": max_new_tokens if method == "generate" else None, "model": model_id,
                "noise": noise if method == "logprob" else "pixel"}
    records = Records(records_path) if records_path is not None else None
    rows = records.load_run({k: settings[k] for k in _SETTINGS}) if records is not None else {}
    device = getattr(vlm, "device", "cpu")
    vlm.model.eval()
    todo = [it for it in items if it.question_id not in rows]
    noise_drawn = "embedding" if _embedding_noise(vlm, method, settings["noise"]) else "pixel"
    for it in tqdm(todo, desc=desc or f"certify sigma={sigma}", leave=False):
        t0 = time.perf_counter()
        k = len(it.options)
        x = data.load_images([it], size=image_size)[0].to(device)
        classify, sample = classifier_and_sampler(vlm, it, method=method, prompt=prompt, noise=settings["noise"],
                                                  max_new_tokens=max_new_tokens, image_size=tuple(x.shape[-2:]))
        with torch.no_grad():
            base_pred = int(classify(x.unsqueeze(0))[0])
        c = certify_detail(classify, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                           num_classes=k + 1, generator=item_generator(seed, it.question_id, device), sampler=sample)
        label = LETTERS.index(it.answer)
        row = {"key": it.question_id, "question_id": it.question_id, "dataset": it.dataset,
               "modality": it.modality, "question_type": it.question_type, "n_options": k,
               "answer": it.answer, "label": label, "pred": c.prediction,
               "pred_letter": LETTERS[c.prediction] if 0 <= c.prediction < k else None,
               "radius": c.radius, "p_lower": c.p_lower, "abstain": c.prediction == ABSTAIN,
               "correct": c.prediction == label, "base_pred": base_pred,
               "counts_selection": c.counts_selection.tolist(),
               "counts_estimation": c.counts_estimation.tolist(), "n_drawn": int(c.counts_estimation.sum()),
               "noise_drawn": noise_drawn,
               "seconds": time.perf_counter() - t0, **settings}
        if records is not None:
            records.append(row)
        rows[it.question_id] = row
    return pd.DataFrame([rows[q] for q in ids])
