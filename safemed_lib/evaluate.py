"""Clean and perturbed evaluation of a VLM on multiple-choice VQA items, with per-item records.

``evaluate`` runs a model over items batch by batch and returns one row per item. Two ways to
read an answer off the model:

* ``method="generate"``: greedy decoding with the chosen prompt, then ``prompts.parse_answer``
  on the output text; an output without a valid letter gives ``pred = None`` (counted wrong and
  reported as "invalid").
* ``method="logprob"``: the argmax over options of ``vlm.option_logprobs`` (the teacher-forced
  log-probability of each letter right after ``<answer>``). This is only meaningful for
  answer-only models (``nothink`` prompt): a chain-of-thought model would normally write its
  reasoning before the ``<answer>`` tag, so scoring the letter straight after the prompt skips the
  reasoning it was trained to produce. It never yields an invalid answer.

A ``perturb`` hook (attacks, noise) sees each batch of clean images before the model does:
``perturb(images, items)`` returns either the perturbed images, or ``(images, extras)`` where
``extras`` is a list with one dict per item (e.g. the attack loss) that is copied into that
item's row.

With ``records_path`` every finished batch is appended to a ``safemed_lib.records.Records``
JSONL file (key = question_id), so an interrupted run resumes where it stopped, without
recomputing or duplicating items. The records also carry the run's settings; resuming with
different settings is an error rather than a silent mix. :func:`cached` files such records in a
run directory of :mod:`safemed_lib.runs` keyed by the model and the settings, so an evaluation is
done once and read back afterwards without loading the model.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data, prompts, runs
from .records import Records

LETTERS = "ABCDE"
PROMPT_MODES = ("think", "nothink", "think_after")
METHODS = ("generate", "logprob")

# row fields that identify the run; a records file must not mix runs that differ in them
_SETTINGS = ("prompt", "method", "image_size", "perturbed")


def is_8bit(images: torch.Tensor, atol: float = 1e-4) -> list[bool]:
    """Per image: whether every pixel is (numerically) a multiple of 1/255, i.e. the image the
    model sees could be stored as an 8-bit PNG without change."""
    scaled = images.detach().float() * 255.0
    err = (scaled - scaled.round()).abs().flatten(1).amax(dim=1)
    return [bool(e <= atol * 255.0) for e in err]


def _check_items(items: Sequence[data.VQAItem]) -> None:
    seen: set[str] = set()
    for i, it in enumerate(items):
        if it.question_id in seen:
            raise ValueError(f"items[{i}]: duplicate question_id {it.question_id!r}; evaluate() keys "
                             "its records by question_id, so ids must be unique")
        seen.add(it.question_id)


def _split_perturb_result(out: Any, n: int) -> tuple[torch.Tensor, list[dict]]:
    extras: list[dict] = [{} for _ in range(n)]
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError("perturb must return images or (images, extras)")
        out, extras = out
        if extras is None:
            extras = [{} for _ in range(n)]
        if len(extras) != n or not all(isinstance(e, dict) for e in extras):
            raise ValueError(f"perturb returned extras of length {len(extras)} for a batch of {n}; "
                             "expected one dict per item")
    if not torch.is_tensor(out) or out.shape[0] != n:
        raise ValueError("perturb must return a (B,3,H,W) tensor with the batch's size")
    return out, extras


def _predict(vlm, images, batch, *, prompt, method, max_new_tokens) -> tuple[list, list[str]]:
    if method == "generate":
        with torch.no_grad():
            texts = vlm.generate(images, batch, prompt=prompt, max_new_tokens=max_new_tokens)
        preds = [prompts.parse_answer(t, len(it.options)) for t, it in zip(texts, batch)]
        return preds, texts
    with torch.no_grad():
        scores = vlm.option_logprobs(images, batch, prompt=prompt)
    preds, texts = [], []
    for s, it in zip(scores, batch):
        s = s.detach().float().cpu()
        preds.append(LETTERS[int(s.argmax())])
        texts.append(json.dumps({LETTERS[k]: round(float(v), 4) for k, v in enumerate(s)}))
    return preds, texts


def evaluate(vlm, items: Sequence[data.VQAItem], *, prompt: str = "nothink", image_size: int | None,
             method: str = "generate", perturb: Callable | None = None,
             records_path: str | Path | None = None, batch_size: int = 16,
             max_new_tokens: int = 64, desc: str | None = None) -> pd.DataFrame:
    """Evaluate ``vlm`` on ``items``; one row per item, in the order of ``items``.

    Columns: key, question_id, dataset, modality, question_type, n_options, answer, pred (letter,
    or None for "no valid answer"), correct, output (generated text, or the option log-probs as
    JSON for ``method="logprob"``), prompt, method, image_size, perturbed, rounded_8bit (the image
    fed to the model has pixels on the 1/255 grid), plus whatever the ``perturb`` hook returns per
    item. Images come from ``data.load_images(items, size=image_size)``.
    """
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {prompt!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = list(items)
    _check_items(items)
    settings = {"prompt": prompt, "method": method, "image_size": image_size,
                "perturbed": perturb is not None}

    records = Records(records_path) if records_path is not None else None
    done = records.load_run({k: settings[k] for k in _SETTINGS}) if records is not None else {}
    todo = [it for it in items if it.question_id not in done]
    rows: dict[str, dict] = dict(done)

    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc or f"eval {prompt}/{method}",
               leave=False)
    if todo:  # results all read back from the records need no model (a lazy one is never loaded)
        vlm.model.eval()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = data.load_images(batch, size=image_size)
        extras: list[dict] = [{} for _ in batch]
        if perturb is not None:
            images, extras = _split_perturb_result(perturb(images, batch), len(batch))
        images = images.detach()
        preds, texts = _predict(vlm, images, batch, prompt=prompt, method=method,
                                max_new_tokens=max_new_tokens)
        for it, pred, text, r8, extra in zip(batch, preds, texts, is_8bit(images), extras):
            row = {"key": it.question_id, "question_id": it.question_id, "dataset": it.dataset,
                   "modality": it.modality, "question_type": it.question_type,
                   "n_options": len(it.options), "answer": it.answer, "pred": pred,
                   "correct": pred == it.answer, "output": text, **settings, "rounded_8bit": r8,
                   **extra}
            if records is not None:
                records.append(row)
            rows[it.question_id] = row
        bar.update(len(batch))
    bar.close()
    return pd.DataFrame([rows[it.question_id] for it in items])


RECORDS = "records.jsonl"


class _Recorded:
    """Stands in for a VLM when every result is already recorded (evaluate() then only reads)."""

    class model:  # noqa: N801
        @staticmethod
        def eval():
            return None


def cached(load_model: Callable[[], Any], items: Sequence[data.VQAItem], run_dir: str | Path, *, model_key: Any,
           extra_key: Any = None, **eval_kwargs) -> pd.DataFrame:
    """:func:`evaluate` once per (``model_key``, items, settings, ``extra_key``), with its records in
    ``<run_dir>/records.jsonl`` (a run of ``runs.cached``: an interrupted evaluation resumes, a
    finished one is read back without calling ``load_model``). ``model_key`` names the model (e.g.
    ``zoo.fingerprint``); ``extra_key`` what a ``perturb`` hook does (its settings)."""
    items = list(items)
    settings = {k: v for k, v in eval_kwargs.items() if k not in ("perturb", "desc")}
    key = {"model": model_key, "items": runs.ids_digest(items), "n": len(items), **settings, "perturb": extra_key}
    fresh: dict[str, pd.DataFrame] = {}

    def run(d: Path):
        fresh["df"] = df = evaluate(load_model(), items, records_path=d / RECORDS, **eval_kwargs)
        return {"n": len(df), "accuracy": float(df["correct"].mean()) if len(df) else None}

    def read(d: Path, _):
        if "df" in fresh:
            return fresh["df"]
        return evaluate(_Recorded(), items, records_path=d / RECORDS, **eval_kwargs)

    return runs.cached(Path(run_dir), key, run, load=read)


def _order(values: Sequence[str], canonical: Sequence[str]) -> list[str]:
    known = [v for v in canonical if v in set(values)]
    return known + sorted(set(values) - set(canonical))


def accuracy_table(df: pd.DataFrame, by: str | Sequence[str] = "modality") -> pd.DataFrame:
    """Accuracy (%), item count and invalid-answer rate (%) per group of ``by``, plus an "All" row.

    Groups follow the canonical order of ``data.MODALITIES`` / ``data.QUESTION_TYPES`` (other
    columns are sorted); with several ``by`` columns the "All" row has "All" in every level.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, "correct", "pred"] if c not in df.columns]
    if missing:
        raise ValueError(f"accuracy_table: the results have no column(s) {missing}")
    if df.empty:
        raise ValueError("accuracy_table: no results to tabulate")
    canon = {"modality": data.MODALITIES, "question_type": data.QUESTION_TYPES}

    def stats(g: pd.DataFrame) -> dict:
        return {"accuracy": 100.0 * g["correct"].astype(bool).mean(), "n": len(g),
                "invalid": 100.0 * g["pred"].isna().mean()}

    rows = {key if isinstance(key, tuple) else (key,): stats(g)
            for key, g in df.groupby(by, sort=False)}
    orders = [_order(df[c].unique().tolist(), canon.get(c, ())) for c in by]
    keys = sorted(rows, key=lambda k: tuple(o.index(v) for o, v in zip(orders, k)))
    keys_all = keys + [("All",) * len(by)]
    rows[("All",) * len(by)] = stats(df)
    index = (pd.Index([k[0] for k in keys_all], name=by[0]) if len(by) == 1
             else pd.MultiIndex.from_tuples(keys_all, names=by))
    out = pd.DataFrame([rows[k] for k in keys_all], index=index)
    out["n"] = out["n"].astype(int)
    return out


def subset(items: Sequence[data.VQAItem], n: int | None, seed: int = 0) -> list[data.VQAItem]:
    """At most ``n`` items, a seeded random sample kept in the original order (``n`` None or 0:
    all). Test lists are grouped by source file, so a plain ``items[:n]`` would cover one
    modality only."""
    items = list(items)
    if not n or n >= len(items):
        return items
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [it for i, it in enumerate(items) if i in keep]


def mcnemar_p(gains: int, losses: int) -> float:
    """Two-sided exact McNemar p-value (statsmodels) from the discordant pairs of a paired
    comparison: ``gains`` items only the second condition got right, ``losses`` only the first.
    1.0 when there are none."""
    from statsmodels.stats.contingency_tables import mcnemar

    if min(gains, losses) < 0:
        raise ValueError(f"mcnemar_p: counts must be >= 0, got {gains}, {losses}")
    return float(mcnemar([[0, losses], [gains, 0]], exact=True).pvalue)


def paired_test(a: pd.DataFrame, b: pd.DataFrame, alpha: float = 0.05) -> dict:
    """Paired comparison of two ``evaluate`` results on the same questions: is ``b`` better than ``a``?

    Rows are matched on ``question_id``; both results must hold the same questions. Returns
    ``n``, the accuracies ``acc_a`` and ``acc_b`` (%), ``diff`` = acc_b - acc_a (points) with its
    (1 - ``alpha``) Wald interval for paired proportions (``ci_low``, ``ci_high``), the discordant
    counts ``b_only`` (b right, a wrong) and ``a_only``, and the two-sided exact McNemar p-value
    (statsmodels; a binomial test on the discordant pairs). Paired, because two models scored on
    the same questions share each question's difficulty: this is far tighter than comparing two
    independent accuracies.
    """
    from scipy.stats import norm

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    sides = {}
    for name, df in (("a", a), ("b", b)):
        missing = [c for c in ("question_id", "correct") if c not in df.columns]
        if missing:
            raise ValueError(f"paired_test: result {name} has no column(s) {missing}")
        dup = df["question_id"][df["question_id"].duplicated()].tolist()
        if dup:
            raise ValueError(f"paired_test: result {name} holds question(s) {dup[:3]} more than once")
        sides[name] = df.set_index("question_id")["correct"].astype(bool)
    ca, cb = sides["a"], sides["b"]
    only_a, only_b = sorted(set(ca.index) - set(cb.index)), sorted(set(cb.index) - set(ca.index))
    if only_a or only_b:
        raise ValueError(f"paired_test: the results hold different questions ({len(only_a)} only in a, e.g. "
                         f"{only_a[:3]}; {len(only_b)} only in b, e.g. {only_b[:3]})")
    if ca.empty:
        raise ValueError("paired_test: no results to compare")
    cb = cb.loc[ca.index]
    n = len(ca)
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    p = mcnemar_p(b_only, a_only)
    d = (b_only - a_only) / n
    se = max(b_only + a_only - (b_only - a_only) ** 2 / n, 0.0) ** 0.5 / n
    z = float(norm.ppf(1 - alpha / 2))
    return {"n": n, "acc_a": 100 * ca.mean(), "acc_b": 100 * cb.mean(), "diff": 100 * d,
            "ci_low": 100 * (d - z * se), "ci_high": 100 * (d + z * se), "b_only": b_only, "a_only": a_only,
            "p_value": p}


def compare(results: dict[str, pd.DataFrame], by: str | Sequence[str] = "modality") -> pd.DataFrame:
    """One accuracy column (%) per named result table, grouped by ``by`` (with the "All" row),
    plus the item count ``n`` of the first one; "invalid %" columns follow when any answers are invalid."""
    tables = {name: accuracy_table(df, by) for name, df in results.items()}
    first = next(iter(tables.values()))
    out = pd.DataFrame({name: t["accuracy"] for name, t in tables.items()}, index=first.index)
    for name, t in tables.items():
        if t["invalid"].any():
            out[f"{name} invalid %"] = t["invalid"]
    out["n"] = first["n"]
    return out
