"""The VQA record type, its constants and errors, and the record checks both loaders share.

The one record type is :class:`VQAItem` (the DESIGN.md contract). Loaders validate every
record and either raise :class:`DataError` naming the file, the record index and the
problem (``strict=True``) or skip the record and report it (``strict=False``): they return
a :class:`LoadResult`, a ``list`` of items that also carries ``.skipped``,
``.unknown_modality`` and ``.bad_files``, so that
``len(result) + len(result.skipped) + len(result.unknown_modality) == result.n_records``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pandas as pd
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


# ---------------------------------------------------------- record checks shared by both loaders

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
