"""Medical VQA data: OmniMedVQA and Med-R1 loaders, image loading, per-image splits.

The one record type is :class:`VQAItem` (the DESIGN.md contract). Loaders validate every
record and either raise :class:`DataError` naming the file, the record index and the
problem (``strict=True``) or skip the record and report it (``strict=False``): they return
a :class:`LoadResult`, a ``list`` of items that also carries ``.skipped``,
``.unknown_modality`` and ``.bad_files``, so that
``len(result) + len(result.skipped) + len(result.unknown_modality) == result.n_records``.

Splits are per image (every question about one image lands on the same side), unlike
Med-R1's per-question split, which leaks test images into training.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "Dermoscopy", "Fundus", "Microscopy", "OCT")
QUESTION_TYPES = (
    "Modality Recognition",
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Other Biological Attributes",
)
LETTERS = "ABCDE"

# OmniMedVQA's `modality_type` strings, verbatim (typos included), -> canonical names.
# The canonical names themselves are accepted too. "unknown" is set apart, not an error.
OMNIMEDVQA_MODALITY = {
    "CT(Computed Tomography)": "CT",
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "X-Ray": "X-Ray",
    "ultrasound": "Ultrasound",
    "Dermoscopy": "Dermoscopy",
    "Fundus Photography": "Fundus",
    "Microscopy Images": "Microscopy",
    "OCT (Optical Coherence Tomography": "OCT",
    **{m: m for m in MODALITIES},
}
UNKNOWN_MODALITY = "unknown"
CHECK_IMAGES = ("none", "exists", "header", "verify")


class DataError(ValueError):
    """Bad input data. ``file``, ``index`` and ``reason`` say where and what, when known."""

    def __init__(self, message: str, *, file: str | None = None, index: int | None = None,
                 reason: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.file, self.index, self.reason, self.kind = file, index, reason, kind


class DataWarning(UserWarning):
    """Records were skipped or set apart while loading (the summary of a LoadResult)."""


@dataclass
class VQAItem:
    """One multiple-choice question about one image (the DESIGN.md contract).

    ``modality_raw`` keeps the source's modality string and ``source`` says where the record
    came from (``file#index``); both are optional extras.
    """

    question_id: str
    dataset: str
    image_path: Path
    question: str
    options: list[str]
    answer: str
    modality: str
    question_type: str
    modality_raw: str = ""
    source: str = ""

    def __post_init__(self):
        self.image_path = Path(self.image_path)
        self.options = list(self.options)
        where = f"VQAItem {self.question_id!r}"
        if not self.image_path.is_absolute():
            raise DataError(f"{where}: image_path must be absolute, got {str(self.image_path)!r}")
        if not 2 <= len(self.options) <= 5:
            raise DataError(f"{where}: needs 2 to 5 options, got {len(self.options)}")
        if self.answer not in LETTERS[: len(self.options)]:
            raise DataError(f"{where}: answer must be a letter in "
                            f"{LETTERS[:len(self.options)]!r}, got {self.answer!r}")
        if self.modality not in MODALITIES:
            raise DataError(f"{where}: modality {self.modality!r} is not one of {MODALITIES}")
        if self.question_type not in QUESTION_TYPES:
            raise DataError(f"{where}: question_type {self.question_type!r} is not one of "
                            f"{QUESTION_TYPES}")

    @property
    def answer_text(self) -> str:
        """The text of the correct option."""
        return self.options[LETTERS.index(self.answer)]


@dataclass
class Skipped:
    """A record that did not become a VQAItem: where it was, and why.

    ``kind`` is a short category (counted in the warning), ``reason`` the full message;
    ``record`` keeps the raw record (for records set apart with an unknown modality).
    """

    file: str
    index: int
    question_id: str | None
    kind: str
    reason: str
    record: dict | None = field(default=None, repr=False)


class LoadResult(list):
    """The loaded VQAItems (a list) plus what was not loaded.

    - ``skipped``: bad records (lenient mode only; strict mode raises instead),
    - ``unknown_modality``: valid records whose modality is ``unknown`` (kept apart in both
      modes, because a VQAItem's modality must be one of MODALITIES),
    - ``bad_files``: ``(file, reason)`` for files that could not be read at all (lenient),
    - ``n_records``: records read from the files that could be read.
    """

    def __init__(self, items=(), *, skipped=(), unknown_modality=(), bad_files=(), n_records=0):
        super().__init__(items)
        self.skipped: list[Skipped] = list(skipped)
        self.unknown_modality: list[Skipped] = list(unknown_modality)
        self.bad_files: list[tuple[str, str]] = list(bad_files)
        self.n_records = n_records

    def summary(self) -> dict[str, int]:
        """Counts: loaded, each skip kind, unknown modality, unreadable files."""
        out = {"loaded": len(self), "records_read": self.n_records}
        out.update(Counter(s.kind for s in self.skipped))
        if self.unknown_modality:
            out["unknown_modality"] = len(self.unknown_modality)
        if self.bad_files:
            out["bad_files"] = len(self.bad_files)
        return out

    def report(self) -> pd.DataFrame:
        """One row per record not loaded (skipped or unknown modality) and per bad file."""
        rows = [dict(status="skipped", file=s.file, index=s.index, question_id=s.question_id,
                     kind=s.kind, reason=s.reason) for s in self.skipped]
        rows += [dict(status="unknown_modality", file=s.file, index=s.index,
                      question_id=s.question_id, kind=s.kind, reason=s.reason)
                 for s in self.unknown_modality]
        rows += [dict(status="bad_file", file=f, index=None, question_id=None, kind="bad_file",
                      reason=r) for f, r in self.bad_files]
        return pd.DataFrame(rows, columns=["status", "file", "index", "question_id", "kind",
                                           "reason"])

    def _warn(self, what: str) -> None:
        s = {k: v for k, v in self.summary().items() if k not in ("loaded", "records_read")}
        if s:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(s.items()))
            warnings.warn(f"{what}: loaded {len(self)} of {self.n_records} records; not loaded: "
                          f"{detail} (see .report())", DataWarning, stacklevel=4)


class _RecordError(Exception):
    """Internal: one record is bad (kind, message)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


# ----------------------------------------------------------------------------- helpers

def _norm_answer(text: str) -> str:
    """Case-folded, surrounding whitespace and trailing periods removed."""
    return text.strip().rstrip(".").strip().casefold()


def _safe_image_path(root: Path, rel: str, check: str, cache: dict) -> Path:
    """``root / rel`` as an absolute path inside ``root``, checked as ``check`` says.

    Absolute paths, ``..`` components and symlinks resolving outside ``root`` are refused.
    ``cache`` memoises image checks (several questions share an image).
    """
    if not rel.strip():
        raise _RecordError("bad_image_path", "image path is empty")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or \
            PureWindowsPath(rel).drive:
        raise _RecordError("path_escape", f"image path {rel!r} is absolute; it must be "
                                          f"relative to the dataset root")
    parts = re.split(r"[\\/]", rel)
    if ".." in parts:
        raise _RecordError("path_escape", f"image path {rel!r} contains '..'")
    path = root / Path(*[p for p in parts if p not in ("", ".")])
    if check == "none":
        return path
    if path in cache:
        err = cache[path]
    else:
        err = _check_image(root, path, rel, check)
        cache[path] = err
    if err is not None:
        raise err
    return path


def _check_image(root: Path, path: Path, rel: str, check: str) -> _RecordError | None:
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root.resolve()):
        return _RecordError("path_escape", f"image path {rel!r} resolves to {real}, outside "
                                           f"the dataset root {root} (symlink?)")
    if not real.is_file():
        return _RecordError("missing_image", f"image {rel!r} not found under {root}")
    if check == "exists":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(real) as im:
                if check == "verify":
                    im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _RecordError("unreadable_image", f"image {rel!r} is too large: {e}")
    except Exception as e:  # PIL raises many types for broken files
        return _RecordError("unreadable_image", f"image {rel!r} cannot be read by PIL: "
                                                f"{type(e).__name__}: {e}")
    return None


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e}", file=str(path), reason=str(e),
                        kind="bad_file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}", file=str(path), reason=str(e),
                        kind="bad_file") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}",
                        file=str(path), reason="not a list", kind="bad_file")
    return data


def _field(rec: dict, key: str, kind: type = str) -> Any:
    if key not in rec:
        raise _RecordError("missing_field", f"missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind) or (kind is str and not v.strip()):
        raise _RecordError("bad_type", f"field {key!r} must be a non-empty {kind.__name__}, "
                                       f"got {v!r}")
    return v


def _qid(rec: Any) -> str | None:
    q = rec.get("question_id") if isinstance(rec, dict) else None
    return q if isinstance(q, str) else (None if q is None else repr(q))


class _Loader:
    """Collects items, skips and duplicates for one load call (strict or lenient)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: list[VQAItem] = []
        self.skipped: list[Skipped] = []
        self.unknown: list[Skipped] = []
        self.bad_files: list[tuple[str, str]] = []
        self.n_records = 0
        self.seen: dict[str, str] = {}  # question_id -> "file#index"

    def file_error(self, err: DataError) -> None:
        if self.strict:
            raise err
        self.bad_files.append((err.file or "?", str(err)))

    def fail(self, file: str, index: int, rec: Any, err: _RecordError) -> None:
        qid = _qid(rec)
        if self.strict:
            raise DataError(f"{file}: record {index} (question_id {qid!r}): {err.message}",
                            file=file, index=index, reason=err.message, kind=err.kind)
        self.skipped.append(Skipped(file, index, qid, err.kind, err.message))

    def claim_id(self, qid: str, where: str) -> None:
        if qid in self.seen:
            raise _RecordError("duplicate_id", f"duplicate question_id {qid!r} "
                                               f"(first seen at {self.seen[qid]})")
        self.seen[qid] = where

    def result(self, what: str) -> LoadResult:
        res = LoadResult(self.items, skipped=self.skipped, unknown_modality=self.unknown,
                         bad_files=self.bad_files, n_records=self.n_records)
        assert len(res) + len(res.skipped) + len(res.unknown_modality) == res.n_records
        res._warn(what)
        return res


# ----------------------------------------------------------------------------- OmniMedVQA

def _parse_omni_record(rec: Any, root: Path, check: str, cache: dict) -> tuple[dict, str]:
    """Validate one OmniMedVQA record; returns (VQAItem kwargs without modality, raw modality)."""
    if not isinstance(rec, dict):
        raise _RecordError("bad_type", f"record must be a JSON object, got {type(rec).__name__}")
    qid = _field(rec, "question_id")
    dataset = _field(rec, "dataset")
    question = _field(rec, "question")
    qtype = _field(rec, "question_type")
    gt = _field(rec, "gt_answer")
    rel = _field(rec, "image_path")
    if "modality_type" in rec and "modality" in rec:
        raise _RecordError("bad_modality", "both 'modality_type' and 'modality' are present")
    mkey = "modality" if "modality" in rec else "modality_type"
    raw_mod = _field(rec, mkey)

    option_keys = sorted(k for k in rec if k.startswith("option_"))
    unexpected = [k for k in option_keys if k[len("option_"):] not in LETTERS or len(k) != 8]
    if unexpected:
        raise _RecordError("bad_options", f"unexpected option fields {unexpected} "
                                          f"(option_A..option_E allowed)")
    n = len(option_keys)
    if option_keys != [f"option_{c}" for c in LETTERS[:n]]:
        raise _RecordError("bad_options", f"options must be contiguous from option_A, "
                                          f"got {option_keys}")
    if not 2 <= n <= 5:
        raise _RecordError("bad_options", f"needs 2 to 5 options, got {n}")
    options = [_field(rec, k) for k in option_keys]

    if qtype not in QUESTION_TYPES:
        raise _RecordError("bad_question_type", f"question_type {qtype!r} is not one of "
                                                f"{QUESTION_TYPES}")
    if raw_mod != UNKNOWN_MODALITY and raw_mod not in OMNIMEDVQA_MODALITY:
        raise _RecordError("bad_modality", f"{mkey} {raw_mod!r} is not a known OmniMedVQA "
                                           f"modality ({sorted(OMNIMEDVQA_MODALITY)} or "
                                           f"'unknown')")
    hits = [LETTERS[i] for i, o in enumerate(options) if _norm_answer(o) == _norm_answer(gt)]
    if not hits:
        raise _RecordError("answer_no_match", f"gt_answer {gt!r} matches no option {options}")
    if len(hits) > 1:
        raise _RecordError("answer_ambiguous", f"gt_answer {gt!r} matches several options "
                                               f"{hits}")
    image_path = _safe_image_path(root, rel, check, cache)
    return dict(question_id=qid, dataset=dataset, image_path=image_path, question=question,
                options=options, answer=hits[0], question_type=qtype), raw_mod


def load_omnimedvqa(root: str | Path, access: str = "Open-access", strict: bool = True, *,
                    check_images: str = "header", datasets: Sequence[str] | None = None
                    ) -> LoadResult:
    """Load OmniMedVQA's ``QA_information/<access>/*.json`` as VQAItems.

    ``root`` holds ``Images/`` and ``QA_information/``; files are read in name order,
    records in file order. Each record needs ``question_id``, ``dataset``, ``question``,
    ``question_type`` (one of QUESTION_TYPES), ``gt_answer``, ``image_path`` (relative to
    root, staying inside it, symlinks included), ``modality_type`` (or ``modality``, as in
    one record of ``Chest CT Scan.json``; the verbatim strings map through
    ``OMNIMEDVQA_MODALITY``) and 2-5 contiguous ``option_A``..``option_E``. ``gt_answer`` is
    option text and must match exactly one option, case-insensitively, ignoring surrounding
    whitespace and a trailing period. question_ids must be unique across all files.

    ``check_images``: ``"header"`` (default; PIL opens the file: format and size from the
    header, refusing decompression bombs, no pixel decoding), ``"verify"`` (also PIL's
    ``verify()``: reads the whole file and checks its integrity, e.g. PNG CRCs, still without
    decoding; slower), ``"exists"`` (a regular file inside root) or ``"none"`` (path syntax
    only). Each image is checked once, however many questions use it.

    ``strict=True``: the first bad record raises DataError naming file, record index and the
    problem. ``strict=False``: bad records (and unreadable files) are skipped and reported in
    the result and in one DataWarning summarising counts by kind. Records whose modality is
    ``unknown`` are valid but kept apart in ``result.unknown_modality`` in both modes.
    ``datasets``: only read these file stems (e.g. ``["ACRIMA"]``).
    """
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    root = Path(root).expanduser().absolute()
    qa_dir = root / "QA_information" / access
    if not qa_dir.is_dir():
        have = sorted(p.name for p in (root / "QA_information").glob("*") if p.is_dir()) \
            if (root / "QA_information").is_dir() else []
        raise DataError(f"{qa_dir} is not a directory: is {root} an OmniMedVQA root "
                        f"(Images/, QA_information/<access>/)? access folders found: {have}")
    files = sorted(qa_dir.glob("*.json"))
    if datasets is not None:
        wanted = set(datasets)
        missing = wanted - {f.stem for f in files}
        if missing:
            raise DataError(f"{qa_dir}: no JSON file for datasets {sorted(missing)}")
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise DataError(f"{qa_dir} holds no *.json files")

    ld, cache = _Loader(strict), {}
    for f in files:
        name = f"{access}/{f.name}"
        try:
            records = _read_json_list(f)
        except DataError as e:
            ld.file_error(e)
            continue
        for i, rec in enumerate(records):
            ld.n_records += 1
            try:
                kw, raw_mod = _parse_omni_record(rec, root, check_images, cache)
                ld.claim_id(kw["question_id"], f"{name}#{i}")
            except _RecordError as e:
                ld.fail(name, i, rec, e)
                continue
            if raw_mod == UNKNOWN_MODALITY:
                ld.unknown.append(Skipped(name, i, kw["question_id"], "unknown_modality",
                                          f"modality {raw_mod!r}", record=rec))
                continue
            ld.items.append(VQAItem(**kw, modality=OMNIMEDVQA_MODALITY[raw_mod],
                                    modality_raw=raw_mod, source=f"{name}#{i}"))
    return ld.result(f"load_omnimedvqa({root}, {access!r})")


# ----------------------------------------------------------------------------- Med-R1

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


# ----------------------------------------------------------------------------- images

def _open_image(path: Path) -> Image.Image:
    """Open and decode ``path``; decompression bombs and unreadable files -> DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to load safely ({e}); PIL's limit is "
                        f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}") from None
    except Exception as e:
        raise DataError(f"image {path} cannot be read by PIL: {type(e).__name__}: {e}") from None
    return im


def _to_rgb_or_float(im: Image.Image, path: Path) -> Image.Image:
    """An 8-bit ``RGB`` image, or a grey ``F`` image in [0, 1] for high-bit-depth input.

    - 16-bit greyscale (``I;16*``, or ``I`` with values in 0..65535) is divided by 65535
      (the container's range; PIL's own ``convert("RGB")`` would clip it at 255);
      ``F`` must already lie in [0, 1].
    - Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited
      on black, the background of most medical modalities: rgb * alpha.
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...) goes
      through PIL's ``convert("RGB")``.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            lo, hi, scale = 0.0, 1.0, 1.0
        else:
            lo, hi, scale = 0.0, 65535.0, 65535.0
        if a.size and (a.min() < lo or a.max() > hi):
            raise DataError(f"image {path}: mode {mode} values span [{a.min()}, {a.max()}], "
                            f"outside the supported range [{lo}, {hi}]")
        return Image.fromarray((a / scale).astype(np.float32), mode="F")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    return im if mode == "RGB" else im.convert("RGB")


def load_image(path: str | Path, size: int | None = None, *, grid: int | None = 28
               ) -> torch.Tensor:
    """Read an image as a float tensor (3, H, W) in [0, 1] (RGB).

    Any PIL mode is accepted (see ``_to_rgb_or_float``: 16-bit scaled by 65535,
    transparency composited on black). With ``size``, the image is resized to
    ``size x size`` with PIL bicubic (aspect ratio not kept). This only approximates what
    the Hugging Face Qwen2-VL processor would do with the original (its smart_resize keeps
    the aspect ratio and rounds differently), so models should see images stored and
    attacked at this size. Without ``size``, H and W must already be multiples of ``grid``
    (Qwen2-VL's 28-pixel grid) or a DataError says so; ``size`` itself must be a multiple of
    ``grid`` too. ``grid=None`` turns the grid check off. Images larger than PIL's
    ``Image.MAX_IMAGE_PIXELS`` (decompression bombs) raise DataError.
    """
    path = Path(path)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise DataError(f"size must be a positive int, got {size!r}")
    if grid and size is not None and size % grid:
        up = math.ceil(size / grid) * grid
        raise DataError(f"size {size} is not a multiple of {grid} (the model's pixel grid); "
                        f"use e.g. {up}, or grid=None")
    im = _to_rgb_or_float(_open_image(path), path)
    if size is not None:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    elif grid and (im.width % grid or im.height % grid):
        raise DataError(f"image {path} is {im.width}x{im.height}, not on the {grid}-pixel grid; "
                        f"pass size= (e.g. size={max(grid, round(max(im.size) / grid) * grid)}) "
                        f"to resize it")
    if im.mode == "F":
        x = torch.from_numpy(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0).copy())
        return x.unsqueeze(0).expand(3, -1, -1).contiguous()
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float().div_(255.0)


def load_images(items: Sequence[VQAItem | str | Path], size: int | None, *,
                grid: int | None = 28) -> torch.Tensor:
    """A batch (B, 3, size, size) from VQAItems or paths (see :func:`load_image`).

    With ``size=None`` all images must already share one on-grid shape.
    """
    paths = [it.image_path if isinstance(it, VQAItem) else Path(it) for it in items]
    if not paths:
        raise DataError("load_images: no items")
    xs = [load_image(p, size, grid=grid) for p in paths]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"load_images: images have different shapes {sorted(shapes)}; pass size=")
    return torch.stack(xs)


# ----------------------------------------------------------------------------- splits

def _image_key(item: VQAItem) -> str:
    return os.path.normpath(item.image_path)


def _image_stratum(group: list[VQAItem]) -> tuple[str, str]:
    """An image's stratum: its most common modality and question type (ties: the order of
    MODALITIES / QUESTION_TYPES)."""
    def most_common(values, order):
        c = Counter(values)
        return max(order, key=lambda v: (c[v], -order.index(v)))
    return (most_common([i.modality for i in group], MODALITIES),
            most_common([i.question_type for i in group], QUESTION_TYPES))


def split_by_image(items: Sequence[VQAItem], test_frac: float = 0.2, seed: int = 0
                   ) -> tuple[list[VQAItem], list[VQAItem]]:
    """Split items into (train, test) per image, seeded and stratified.

    All questions of one image go to the same side. Images are stratified by
    (modality, question type) of the image, where an image with several question types uses
    its most common one (ties: QUESTION_TYPES order). ``round(test_frac * n_images)`` images go
    to test, shared among strata by largest remainder (so small strata still contribute in
    proportion); within each stratum images are shuffled with ``random.Random(seed)`` after
    sorting by path, so the result depends only on the items and the seed, not their order.
    The fraction is of images; question counts follow approximately. Both lists keep the
    input order.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    by_image: dict[str, list[VQAItem]] = defaultdict(list)
    for it in items:
        by_image[_image_key(it)].append(it)
    if len(by_image) < 2:
        raise DataError(f"split_by_image needs at least 2 images, got {len(by_image)}")
    strata: dict[tuple, list[str]] = defaultdict(list)
    for key, group in by_image.items():
        strata[_image_stratum(group)].append(key)
    rng = random.Random(seed)
    order = sorted(strata)
    n_test = min(max(1, round(test_frac * len(by_image))), len(by_image) - 1)
    quota = {s: test_frac * len(strata[s]) for s in order}
    take = {s: math.floor(quota[s]) for s in order}
    tiebreak = {s: rng.random() for s in order}
    for s in sorted(order, key=lambda s: (-(quota[s] - take[s]), tiebreak[s]))[
            : max(0, n_test - sum(take.values()))]:
        take[s] += 1
    test_images: set[str] = set()
    for s in order:
        keys = sorted(strata[s])
        rng.shuffle(keys)
        test_images.update(keys[: take[s]])
    train = [it for it in items if _image_key(it) not in test_images]
    test = [it for it in items if _image_key(it) in test_images]
    return train, test


def cross_splits(train: Sequence[VQAItem], test: Sequence[VQAItem], by: str = "modality"
                 ) -> dict[str, tuple[list[VQAItem], list[VQAItem]]]:
    """Med-R1's generalisation protocol: ``{group: (train items of group, all test items)}``.

    ``by="modality"`` gives the rows of the 8x8 cross-modality matrix, ``"question_type"``
    those of the 5x5 cross-task matrix (evaluate each model on ``test`` and group its
    accuracy by the same key for the columns). Built on a per-image split: raises DataError if
    ``train`` and ``test`` share an image. Groups come in MODALITIES / QUESTION_TYPES order;
    groups with no training item are left out.
    """
    if by not in ("modality", "question_type"):
        raise ValueError(f"by must be 'modality' or 'question_type', got {by!r}")
    assert_no_leakage(train=train, test=test)
    test = list(test)
    groups = MODALITIES if by == "modality" else QUESTION_TYPES
    out = {}
    for g in groups:
        sub = [it for it in train if getattr(it, by) == g]
        if sub:
            out[g] = (sub, test)
    return out


def leakage_report(**splits: Sequence[VQAItem]) -> pd.DataFrame:
    """Images shared between any two named splits: one row per (split pair, image).

    Columns ``split_a, split_b, image_path, n_a, n_b`` (questions about that image in each
    split); empty when the splits are clean. Images are compared by normalised path.
    """
    cols = ["split_a", "split_b", "image_path", "n_a", "n_b"]
    counts_ = {name: Counter(_image_key(it) for it in items) for name, items in splits.items()}
    names = list(splits)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for img in sorted(counts_[a].keys() & counts_[b].keys()):
                rows.append((a, b, img, counts_[a][img], counts_[b][img]))
    return pd.DataFrame(rows, columns=cols)


def assert_no_leakage(**splits: Sequence[VQAItem]) -> None:
    """Raise DataError if any image appears in two of the named splits."""
    rep = leakage_report(**splits)
    if len(rep):
        pairs = rep.groupby(["split_a", "split_b"]).size()
        detail = "; ".join(f"{a}/{b}: {n} images" for (a, b), n in pairs.items())
        raise DataError(f"image leakage between splits ({detail}), e.g. "
                        f"{rep.image_path.iloc[0]}")


# ----------------------------------------------------------------------------- tables

def counts(items: Iterable[VQAItem], unit: str = "questions") -> pd.DataFrame:
    """A modality x question_type table of counts (all 8 x 5 cells, zeros included).

    ``unit="questions"`` counts items; ``"images"`` counts distinct images per cell.
    """
    if unit not in ("questions", "images"):
        raise ValueError(f"unit must be 'questions' or 'images', got {unit!r}")
    cells: dict[tuple, set | int] = defaultdict(set) if unit == "images" else Counter()
    for it in items:
        k = (it.modality, it.question_type)
        if unit == "images":
            cells[k].add(_image_key(it))
        else:
            cells[k] += 1
    table = pd.DataFrame(0, index=pd.Index(MODALITIES, name="modality"),
                         columns=pd.Index(QUESTION_TYPES, name="question_type"))
    for (m, q), v in cells.items():
        table.loc[m, q] = len(v) if unit == "images" else v
    return table


def to_frame(items: Iterable[VQAItem]) -> pd.DataFrame:
    """One row per item (image_path as str, options as a list)."""
    rows = [{**asdict(it), "image_path": str(it.image_path)} for it in items]
    return pd.DataFrame(rows, columns=[f for f in VQAItem.__dataclass_fields__])
