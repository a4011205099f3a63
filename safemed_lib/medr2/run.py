"""Running the benchmark: stage items through evaluate, the stepwise chain, every condition.

The tables are tidy, one row per (case, stage) asked, built on ``evaluate.evaluate``'s rows and
resumable through its records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from .. import data
from .cases import LETTERS, StepwiseCase
from .cues import CUES, Cue, get_cue
from .items import CONTEXTS, StageItem, question_text, stage_item, to_vqa


def _stage_meta(si: StageItem, context: str) -> dict:
    return {"case_id": si.case.case_id, "k": si.k, "stage": si.q.stage, "cue": si.cue,
            "cue_target": si.cue_target, "context": context,
            "answer_text": si.q.answer_text, "question_text": question_text(si)}


def evaluate_stage_items(vlm, stage_items: Sequence[StageItem], *, cue: str | Cue | None = None,
                         attack: Callable | None = None, prompt: str = "nothink", image_size: int | None,
                         method: str = "generate", records_path: str | Path | None = None,
                         batch_size: int = 16, max_new_tokens: int = 64, context: str = "",
                         chunk: int = 256, desc: str | None = None) -> pd.DataFrame:
    """Run ``evaluate.evaluate`` on stage items, with an optional cue applied to each
    (item, image) and an optional ``attack`` hook (e.g. ``attacks.pgd_perturb``) applied after it.

    Items the cue does not apply to are an error (filter with ``Cue.applies``). Images are loaded
    and cued ``chunk`` items at a time (bounded memory); the cued image reaches the model through
    evaluate's ``perturb`` hook, so a PGD attack starts from the cued image. Returns evaluate's
    rows plus case_id, k, stage, cue, cue_target (the letter a cue suggests, if any), context,
    answer_text and question_text."""
    from ..evaluate import evaluate

    cue = get_cue(cue)
    frames = []
    for start in range(0, len(stage_items), chunk):
        part, cued, images, loaded = list(stage_items[start:start + chunk]), [], {}, {}
        for si in part:
            if cue is None:
                cued.append(si)
                continue
            path = si.case.image_path
            if path not in loaded:
                loaded[path] = data.load_image(path, size=image_size)
            si2, img = cue(si, loaded[path])
            cued.append(si2)
            if cue.kind == "visual":
                images[si2.question_id] = img
        items = [to_vqa(si) for si in cued]
        hook = None
        if images or attack is not None:
            def hook(batch_images, batch_items, _images=images):
                if _images:
                    batch_images = torch.stack([_images.get(it.question_id, x).to(x)
                                                for x, it in zip(batch_images, batch_items)])
                return batch_images if attack is None else attack(batch_images, batch_items)
        df = evaluate(vlm, items, prompt=prompt, image_size=image_size, method=method, perturb=hook,
                      records_path=records_path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      desc=desc)
        meta = pd.DataFrame([_stage_meta(si, context) for si in cued])
        frames.append(pd.concat([meta, df.drop(columns=[c for c in meta.columns if c in df.columns])], axis=1))
    return pd.concat(frames, ignore_index=True)


def run_stepwise(vlm, cases: Sequence[StepwiseCase], *, context: str = "model", cue: str | Cue | None = None,
                 attack: Callable | None = None, prompt: str = "nothink", image_size: int | None,
                 method: str = "generate", records_dir: str | Path | None = None, name: str | None = None,
                 batch_size: int = 16, max_new_tokens: int = 64, label: str | None = None) -> pd.DataFrame:
    """All stages of ``cases``, stage by stage; one row per (case, stage) the cue applies to.

    ``context``: "none" (each stage alone), "gold" (the earlier gold answers), or "model" (the
    model's own earlier answers from this run: the stepwise chain; an invalid answer is shown as
    "no answer"). With ``records_dir`` each stage's rows go to ``<records_dir>/<name>_s<k>.jsonl``
    (resumable; ``name`` defaults to ``label``, the cue's name or "clean"; give each model its own
    folder). ``label`` replaces the ``cue`` column (e.g. "pgd+box_true" for a cue with an attack).
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    cue = get_cue(cue)
    cases = list(cases)
    if not cases:
        raise ValueError("run_stepwise: no cases")
    name = name or label or (cue.name if cue else "clean")
    n_stages = len(cases[0].stages)
    answers: dict[str, list[str]] = {c.case_id: [] for c in cases}
    frames = []
    for k in range(n_stages):
        sis = []
        for c in cases:
            ctx = tuple(answers[c.case_id]) if context == "model" else context
            si = stage_item(c, k, ctx)
            if cue is None or cue.applies(si):
                sis.append(si)
            elif context == "model":
                raise ValueError(f"context='model' needs every stage, but cue {cue.name} skips "
                                 f"{si.question_id}; use context='gold'")
        if not sis:
            continue
        rec = None if records_dir is None else Path(records_dir) / f"{name}_s{k}.jsonl"
        df = evaluate_stage_items(vlm, sis, cue=cue, attack=attack, prompt=prompt, image_size=image_size,
                                  method=method, records_path=rec, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, context=context,
                                  desc=f"{name} stage {k} ({context})")
        for si, pred in zip(sis, df["pred"]):
            answers[si.case.case_id].append(si.q.options[LETTERS.index(pred)]
                                            if isinstance(pred, str) and pred in LETTERS[:len(si.q.options)]
                                            else "no answer")
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    if label is not None:
        out["cue"] = label
    return out


def run_suite(vlm, cases: Sequence[StepwiseCase], *, cues: Sequence[str] = tuple(CUES),
              attack: Callable | None = None, attack_cues: Sequence[str | None] = (None,),
              attack_name: str = "pgd", attack_n_cases: int | None = None, prompt: str = "nothink",
              image_size: int | None, method: str = "generate", records_dir: str | Path | None = None,
              batch_size: int = 16, max_new_tokens: int = 64) -> pd.DataFrame:
    """Every condition of the benchmark for one model, as one table with a ``cue`` and a
    ``context`` column: the clean chain (``context="model"``), clean stages alone ("none") and
    after the gold answers ("gold", the baseline of the cue runs), each cue in ``cues`` (gold
    context), and, with an ``attack`` hook, the attack combined with each of ``attack_cues``
    (None = the attack alone; labelled "pgd", "pgd+box_true", ...) on the first ``attack_n_cases``
    cases (all if None; attacks cost far more than clean runs)."""
    for what, v in (("cues", cues), ("attack_cues", attack_cues)):
        if isinstance(v, str):
            raise ValueError(f"{what} must be a list of cue names, got the string {v!r}")
    kw = dict(prompt=prompt, image_size=image_size, method=method, batch_size=batch_size,
              max_new_tokens=max_new_tokens)
    kw["records_dir"] = records_dir  # one folder; each run writes <name>_s<k>.jsonl in it
    frames = [run_stepwise(vlm, cases, context=ctx, name=f"clean-{ctx}", **kw) for ctx in ("model", "none", "gold")]
    for c in cues:
        frames.append(run_stepwise(vlm, cases, context="gold", cue=c, **kw))
    if attack is not None:
        for c in attack_cues:
            label = attack_name if c is None else f"{attack_name}+{get_cue(c).name}"
            frames.append(run_stepwise(vlm, list(cases)[:attack_n_cases], context="gold", cue=c, attack=attack,
                                       label=label, **kw))
    return pd.concat(frames, ignore_index=True)
