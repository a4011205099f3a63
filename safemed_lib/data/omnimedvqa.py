"""The OmniMedVQA loader: ``QA_information/<access>/*.json`` records, validated, as VQAItems."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .items import (CHECK_IMAGES, LETTERS, OMNIMEDVQA_MODALITY, QUESTION_TYPES, UNKNOWN_MODALITY,
                    DataError, LoadResult, Skipped, VQAItem, _field, _Loader, _norm_answer,
                    _read_json_list, _RecordError, _safe_image_path)


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
