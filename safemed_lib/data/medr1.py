"""The Med-R1 split loader: ``{"image", "problem", "solution"}`` records as VQAItems."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .items import (CHECK_IMAGES, LETTERS, MODALITIES, QUESTION_TYPES, DataError, LoadResult,
                    VQAItem, _field, _Loader, _norm_answer, _read_json_list, _RecordError,
                    _safe_image_path)

_ANSWER_RE = re.compile(r"<answer>\s*([A-Ea-e])\s*</answer>", re.S)


def parse_medr1_problem(problem: str) -> tuple[str, list[str]]:
    """Split Med-R1's ``"question? A)opt, B)opt, ..."`` into (question, options).

    Options are found as a chain ``A)`` ``, B)`` ``, C)`` ... after the question; option
    text may itself contain commas and parentheses (e.g. ``B)Positron emission tomography
    (PET)``). Raises ValueError when no chain of 2-5 options is found.
    """
    starts = [m.start(1) for m in re.finditer(r"(?:^|\s)(A\))", problem)]
    for a in reversed(starts):  # the last "A)" that starts a valid chain
        question, rest = problem[:a].strip(), problem[a + 2:]
        options, ok = [], True
        for nxt in LETTERS[1:]:
            parts = re.split(rf",\s*{nxt}\)", rest)
            if len(parts) > 2:
                ok = False
                break
            if len(parts) == 1:
                break
            options.append(parts[0].strip())
            rest = parts[1]
        options.append(rest.strip())
        if ok and 2 <= len(options) <= 5 and all(options) and question:
            return question, options
    raise ValueError(f"no options 'A)..., B)...' found in problem {problem!r}")


def _join_key(image_path: Path, question: str, options: Iterable[str]) -> tuple:
    return (os.path.normpath(image_path), " ".join(question.split()).casefold(),
            tuple(sorted(_norm_answer(o) for o in options)))


def _dataset_from_path(rel: str) -> str:
    """The source dataset of a relative image path: the folder after ``Images/``."""
    parts = [p for p in re.split(r"[\\/]", rel) if p not in ("", ".")]
    if parts and parts[0] == "Images":
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else "unknown"


def load_medr1_split(path: str | Path, image_root: str | Path, *,
                     reference: Iterable[VQAItem] | None = None, modality: str | None = None,
                     question_type: str | None = None, strict: bool = True,
                     check_images: str = "header") -> LoadResult:
    """Load a Med-R1 split file: a JSON list of ``{"image", "problem", "solution"}``.

    ``image`` is relative to ``image_root`` (the OmniMedVQA root, e.g.
    ``"Images/MIAS/mdb084.png"``); options are parsed out of ``problem`` by
    :func:`parse_medr1_problem`, the letter out of ``solution`` (``<answer> D </answer>``).

    Med-R1's format has no modality, question type or question id, so:
    - with ``reference`` (e.g. ``load_omnimedvqa(root)``), each record is joined to the
      reference item with the same image, question (whitespace/case-normalised) and option
      set; it takes that item's question_id, dataset, modality and question_type, and its
      correct option text must agree. No or several matches: a record error.
    - without it, ``modality`` and ``question_type`` must be given (one value for the whole
      file, e.g. a per-modality split of a single-task file); question_id becomes
      ``"<file stem>_<index>"`` and dataset the folder after ``Images/``.
    Explicit ``modality``/``question_type`` given together with ``reference`` must agree with
    the joined item. Errors, ``strict`` and ``check_images`` behave as in
    :func:`load_omnimedvqa`.
    """
    path, root = Path(path).expanduser().absolute(), Path(image_root).expanduser().absolute()
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    if modality is not None and modality not in MODALITIES:
        raise DataError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if question_type is not None and question_type not in QUESTION_TYPES:
        raise DataError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
    if reference is None and (modality is None or question_type is None):
        raise DataError(f"{path}: Med-R1's format carries no modality or question type; pass "
                        f"reference=load_omnimedvqa(root) to join them, or modality= and "
                        f"question_type= for the whole file")
    if not root.is_dir():
        raise DataError(f"image_root {root} is not a directory")
    index: dict[tuple, list[VQAItem]] = defaultdict(list)
    for it in reference or ():
        index[_join_key(it.image_path, it.question, it.options)].append(it)

    ld, cache = _Loader(strict), {}
    name = path.name
    records = _read_json_list(path)  # a bad file is fatal here: there is only one
    for i, rec in enumerate(records):
        ld.n_records += 1
        try:
            if not isinstance(rec, dict):
                raise _RecordError("bad_type", f"record must be a JSON object, got "
                                               f"{type(rec).__name__}")
            rel, problem, solution = (_field(rec, k) for k in ("image", "problem", "solution"))
            try:
                question, options = parse_medr1_problem(problem)
            except ValueError as e:
                raise _RecordError("bad_options", str(e)) from None
            m = _ANSWER_RE.fullmatch(solution.strip())
            if not m:
                raise _RecordError("bad_answer", f"solution {solution!r} is not "
                                                 f"'<answer> LETTER </answer>'")
            answer = m.group(1).upper()
            if answer not in LETTERS[: len(options)]:
                raise _RecordError("answer_no_match", f"answer {answer!r} but only "
                                                      f"{len(options)} options")
            image_path = _safe_image_path(root, rel, check_images, cache)
            kw = dict(question_id=f"{path.stem}_{i:05d}",
                      dataset=_dataset_from_path(rel),
                      image_path=image_path, question=question, options=options,
                      answer=answer, modality=modality, question_type=question_type)
            if reference is not None:
                hits = index.get(_join_key(image_path, question, options), [])
                if len(hits) != 1:
                    raise _RecordError("no_reference" if not hits else "ambiguous_reference",
                                       f"{len(hits)} reference items match image {rel!r} and "
                                       f"question {question!r} with these options")
                ref = hits[0]
                if _norm_answer(ref.answer_text) != _norm_answer(options[LETTERS.index(answer)]):
                    raise _RecordError("reference_mismatch",
                                       f"answer {answer}) {options[LETTERS.index(answer)]!r} "
                                       f"disagrees with reference {ref.question_id} "
                                       f"({ref.answer_text!r})")
                for key in ("modality", "question_type"):
                    if kw[key] is not None and kw[key] != getattr(ref, key):
                        raise _RecordError("reference_mismatch",
                                           f"{key}={kw[key]!r} given but reference "
                                           f"{ref.question_id} says {getattr(ref, key)!r}")
                kw.update(question_id=ref.question_id, dataset=ref.dataset,
                          modality=ref.modality, question_type=ref.question_type)
            ld.claim_id(kw["question_id"], f"{name}#{i}")
        except _RecordError as e:
            ld.fail(name, i, rec, e)
            continue
        ld.items.append(VQAItem(**kw, source=f"{name}#{i}"))
    return ld.result(f"load_medr1_split({path})")
