"""Stepwise fine-tuning data: every stage of every case as an SFT item, with the gold chain ("stepwise") or alone ("plain").

The fine-tuned models are the zoo's ``r2-stepwise`` and ``r2-plain`` (from SFT-nothink).
"""
from __future__ import annotations

from typing import Sequence

from .. import data
from .cases import StepwiseCase
from .items import stage_item, to_vqa

TRAIN_MODES = ("stepwise", "plain")


def training_items(cases: Sequence[StepwiseCase], mode: str) -> list[data.VQAItem]:
    """SFT items for every stage of every case: "stepwise" shows the earlier stages' gold answers as
    context, "plain" asks each stage alone (same images, questions and answers)."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    ctx = "gold" if mode == "stepwise" else "none"
    return [to_vqa(stage_item(c, k, ctx)) for c in cases for k in range(len(c.stages))]
