"""The stepwise case format: the four stages, StageQuestion / StepwiseCase, the strict JSON file.

The file format (``FORMAT``) is documented in the package docstring (``safemed_lib.medr2``):
:func:`save_stepwise` writes it, :func:`load_stepwise` reads it and raises ``data.DataError``
naming the file, the case and the field for any bad record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from .. import data
from ..data import DataError

FORMAT = "safemed-stepwise/1"
STAGES = ("modality", "localization", "finding", "diagnosis")
STAGE_QUESTION_TYPE = {"modality": "Modality Recognition", "localization": "Anatomy Identification",
                       "finding": "Lesion Grading", "diagnosis": "Disease Diagnosis"}
STAGE_QUESTION = {
    "modality": "Which imaging modality was used to acquire this image?",
    "localization": "Where is the lesion located?",
    "finding": "Which description fits the lesion?",
    "diagnosis": "What is the most likely diagnosis?",
}
STAGE_NOUN = {"modality": "imaging modality", "localization": "lesion location",
              "finding": "finding", "diagnosis": "diagnosis"}
LETTERS = data.LETTERS


@dataclass(frozen=True)
class StageQuestion:
    """One stage's multiple-choice question (options as texts, answer as a letter)."""

    stage: str
    question: str
    options: tuple[str, ...]
    answer: str
    question_type: str

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


@dataclass(frozen=True)
class StepwiseCase:
    """One image with its stage questions, in workflow order.

    ``image_path`` is absolute; ``image_size`` is the stored image's (width, height);
    ``bbox`` is (x0, y0, x1, y1) in its pixels (x1, y1 exclusive) or None.
    """

    case_id: str
    dataset: str
    image_path: Path
    modality: str
    image_size: tuple[int, int]
    bbox: tuple[int, int, int, int] | None
    stages: tuple[StageQuestion, ...]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(q.stage for q in self.stages)


def _validate_case(rec: dict, where: str, stages: Sequence[str], file: str | None, index: int | None
                   ) -> None:
    """Check one case record (JSON form); raise DataError naming ``where`` and the field."""
    def bad(fld: str, why: str):
        raise DataError(f"{where}: field {fld!r}: {why}", file=file, index=index, reason=why)

    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}", file=file, index=index)
    for fld in ("case_id", "dataset", "image_path", "modality", "image_size", "bbox", "stages"):
        if fld not in rec:
            bad(fld, "missing")
    for fld in ("case_id", "dataset", "image_path", "modality"):
        if not isinstance(rec[fld], str) or not rec[fld].strip():
            bad(fld, f"must be a non-empty string, got {rec[fld]!r}")
    rel = PurePosixPath(rec["image_path"])
    if rel.is_absolute() or ".." in rel.parts or "\\" in rec["image_path"]:
        bad("image_path", f"must be a relative POSIX path inside image_root, got {rec['image_path']!r}")
    if rec["modality"] not in data.MODALITIES:
        bad("modality", f"{rec['modality']!r} is not one of {data.MODALITIES}")
    size = rec["image_size"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        bad("image_size", f"must be [width, height] with positive integers, got {size!r}")
    box = rec["bbox"]
    if box is not None:
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in box)):
            bad("bbox", f"must be [x0, y0, x1, y1] integers or null, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
            bad("bbox", f"{box} is not a non-empty box inside the {size[0]}x{size[1]} image "
                        "(need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)")
    qs = rec["stages"]
    if not isinstance(qs, list) or len(qs) != len(stages):
        bad("stages", f"must be a list of {len(stages)} stage questions ({', '.join(stages)}), "
                      f"got {len(qs) if isinstance(qs, list) else type(qs).__name__}")
    for k, (q, name) in enumerate(zip(qs, stages)):
        f = f"stages[{k}]"
        if not isinstance(q, dict):
            bad(f, f"expected an object, got {type(q).__name__}")
        for sub in ("stage", "question", "options", "answer"):
            if sub not in q:
                bad(f"{f}.{sub}", "missing")
        if q["stage"] != name:
            bad(f"{f}.stage", f"expected {name!r} (stage {k} of the file's stage list), got {q['stage']!r}")
        if not isinstance(q["question"], str) or not q["question"].strip():
            bad(f"{f}.question", f"must be a non-empty string, got {q['question']!r}")
        opts = q["options"]
        if (not isinstance(opts, list) or not 2 <= len(opts) <= 5
                or not all(isinstance(o, str) and o.strip() for o in opts)):
            bad(f"{f}.options", f"must be a list of 2 to 5 non-empty strings, got {opts!r}")
        if len({o.strip().casefold() for o in opts}) != len(opts):
            bad(f"{f}.options", f"options must be distinct, got {opts!r}")
        if not isinstance(q["answer"], str) or q["answer"] not in LETTERS[:len(opts)]:
            bad(f"{f}.answer", f"must be a letter in {LETTERS[:len(opts)]!r}, got {q['answer']!r}")
        qt = q.get("question_type", STAGE_QUESTION_TYPE.get(name))
        if qt is None:
            bad(f"{f}.question_type", f"missing (required for stage names other than {STAGES})")
        if qt not in data.QUESTION_TYPES:
            bad(f"{f}.question_type", f"{qt!r} is not one of {data.QUESTION_TYPES}")


def _case_from_record(rec: dict, image_root: Path) -> StepwiseCase:
    qs = tuple(StageQuestion(stage=q["stage"], question=q["question"].strip(),
                             options=tuple(o.strip() for o in q["options"]), answer=q["answer"],
                             question_type=q.get("question_type", STAGE_QUESTION_TYPE.get(q["stage"])))
               for q in rec["stages"])
    return StepwiseCase(case_id=rec["case_id"], dataset=rec["dataset"],
                        image_path=(image_root / rec["image_path"]).resolve(), modality=rec["modality"],
                        image_size=tuple(rec["image_size"]),
                        bbox=None if rec["bbox"] is None else tuple(rec["bbox"]), stages=qs)


def case_record(case: StepwiseCase, image_root: str | Path) -> dict:
    """The JSON form of a case (``image_path`` relative to ``image_root``)."""
    rel = Path(case.image_path).resolve().relative_to(Path(image_root).resolve()).as_posix()
    return {"case_id": case.case_id, "dataset": case.dataset, "image_path": rel,
            "modality": case.modality, "image_size": list(case.image_size),
            "bbox": None if case.bbox is None else list(case.bbox),
            "stages": [{"stage": q.stage, "question_type": q.question_type, "question": q.question,
                        "options": list(q.options), "answer": q.answer} for q in case.stages]}


def save_stepwise(cases: Sequence[StepwiseCase], path: str | Path, image_root: str | Path) -> Path:
    """Write cases in the documented JSON format (atomically); image paths relative to ``image_root``."""
    from ..records import atomic_write_text

    cases = list(cases)
    if not cases:
        raise ValueError("save_stepwise: no cases")
    stages = list(cases[0].stage_names)
    for c in cases:
        if list(c.stage_names) != stages:
            raise ValueError(f"case {c.case_id}: stages {c.stage_names} differ from {stages}")
    doc = {"format": FORMAT, "stages": stages, "cases": [case_record(c, image_root) for c in cases]}
    return atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def load_stepwise(path: str | Path, image_root: str | Path, *, check_images: bool = True
                  ) -> list[StepwiseCase]:
    """Read a stepwise JSON file strictly: any bad record raises ``data.DataError`` naming the file,
    the case (index and id) and the field. ``image_root`` is where ``image_path`` is relative to;
    with ``check_images`` every image file must exist."""
    path, image_root = Path(path), Path(image_root)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", file=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})", file=str(path)) from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with 'format', 'stages', 'cases'", file=str(path))
    if doc.get("format") != FORMAT:
        raise DataError(f"{path}: field 'format' must be {FORMAT!r}, got {doc.get('format')!r}", file=str(path))
    stages = doc.get("stages")
    if (not isinstance(stages, list) or not stages or not all(isinstance(s, str) and s for s in stages)
            or len(set(stages)) != len(stages)):
        raise DataError(f"{path}: field 'stages' must be a non-empty list of distinct stage names, "
                        f"got {stages!r}", file=str(path))
    recs = doc.get("cases")
    if not isinstance(recs, list) or not recs:
        raise DataError(f"{path}: field 'cases' must be a non-empty list", file=str(path))
    out, seen = [], {}
    for i, rec in enumerate(recs):
        cid = rec.get("case_id") if isinstance(rec, dict) else None
        where = f"{path}: case {i}" + (f" ({cid!r})" if cid is not None else "")
        _validate_case(rec, where, stages, str(path), i)
        if cid in seen:
            raise DataError(f"{where}: field 'case_id': duplicate of case {seen[cid]}", file=str(path), index=i)
        seen[cid] = i
        case = _case_from_record(rec, image_root)
        if check_images and not case.image_path.is_file():
            raise DataError(f"{where}: field 'image_path': {case.image_path} does not exist",
                            file=str(path), index=i)
        out.append(case)
    return out
