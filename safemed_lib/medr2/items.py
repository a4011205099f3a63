"""Stage items: one stage of a case as it is asked (earlier answers, cue sentences), as a VQAItem.

The context is "none", the gold answers of the earlier stages ("gold"), or any k earlier answers
(the model's own, in the stepwise chain); :func:`to_vqa` turns a :class:`StageItem` into a
``data.VQAItem`` so ``VLM.generate`` and ``evaluate.evaluate`` run it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .. import data
from .cases import STAGE_NOUN, StageQuestion, StepwiseCase

CONTEXTS = ("none", "gold", "model")


@dataclass(frozen=True)
class StageItem:
    """Stage ``k`` of a case as it is asked: the earlier answers shown as context (option texts for
    stages 0..k-1, or none), cue sentences (``notes``), and which cue made it."""

    case: StepwiseCase
    k: int
    context: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    cue: str = "clean"
    cue_target: str | None = None

    def __post_init__(self):
        if not 0 <= self.k < len(self.case.stages):
            raise ValueError(f"case {self.case.case_id}: stage index {self.k} out of range")
        if self.context and len(self.context) != self.k:
            raise ValueError(f"case {self.case.case_id} stage {self.k}: context must give the "
                             f"{self.k} earlier answers or none, got {len(self.context)}")

    @property
    def q(self) -> StageQuestion:
        return self.case.stages[self.k]

    @property
    def question_id(self) -> str:
        return f"{self.case.case_id}#{self.q.stage}"


def gold_context(case: StepwiseCase, k: int) -> tuple[str, ...]:
    """The gold answers (option texts) of stages 0..k-1."""
    return tuple(q.answer_text for q in case.stages[:k])


def stage_item(case: StepwiseCase, k: int, context: str | Sequence[str] = "gold") -> StageItem:
    """Stage ``k`` of ``case``; ``context``: "none", "gold", or the k earlier answers (texts) to show."""
    if isinstance(context, str):
        if context == "none":
            ctx: tuple[str, ...] = ()
        elif context == "gold":
            ctx = gold_context(case, k)
        else:
            raise ValueError(f"context must be 'none', 'gold' or a list of {k} answers, got {context!r}")
    else:
        ctx = tuple(context)
    return StageItem(case=case, k=k, context=ctx)


def context_sentence(case: StepwiseCase, answers: Sequence[str]) -> str:
    """"Earlier steps: imaging modality: CT scan; lesion location: chest, upper left." """
    parts = [f"{STAGE_NOUN.get(q.stage, q.stage)}: {a}" for q, a in zip(case.stages, answers)]
    return f"Earlier steps: {'; '.join(parts)}." if parts else ""


def question_text(si: StageItem) -> str:
    """The question as the model reads it: context sentence, cue sentences, then the question."""
    return " ".join(p for p in (context_sentence(si.case, si.context), *si.notes, si.q.question) if p)


def to_vqa(si: StageItem) -> data.VQAItem:
    """A ``data.VQAItem`` for the VLM wrapper and ``evaluate``; id ``"<case_id>#<stage>"``."""
    c, q = si.case, si.q
    return data.VQAItem(question_id=si.question_id, dataset=c.dataset, image_path=c.image_path,
                        question=question_text(si), options=list(q.options), answer=q.answer,
                        modality=c.modality, question_type=q.question_type, source=f"stepwise:{si.cue}")
