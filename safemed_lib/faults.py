"""Fault injection over the pipeline: bad files, bad records, odd images, bad model outputs.

:func:`run` builds a small embedded benchmark, adds one injected fault of each kind in the real
OmniMedVQA format, loads it leniently, evaluates what loaded, and accounts for every record:
each one is either loaded (and then evaluated) or skipped with a named reason, every bad file is
reported, and every malformed model output is counted as "no valid answer". ``lost`` counts what
is in none of these; it must be 0. ``tests/test_faults.py`` checks each expected outcome and
``python -m safemed_lib.faults`` prints the table quoted in the README.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import data, prompts, synth

DATASET = "Faults"
# record-level faults: name -> (what is wrong, expected outcome)
RECORD_FAULTS = {
    "missing_image": ("image file does not exist", "skipped"),
    "corrupt_image": ("image file holds random bytes", "skipped"),
    "zero_byte_image": ("image file is empty", "skipped"),
    "huge_image": ("image over PIL's decompression-bomb limit", "skipped"),
    "image_16bit": ("16-bit grayscale PNG", "loaded"),
    "image_rgba": ("RGBA PNG with transparency", "loaded"),
    "image_gray": ("8-bit grayscale PNG", "loaded"),
    "one_option": ("only option_A", "skipped"),
    "six_options": ("option_A..option_F", "skipped"),
    "gt_absent": ("no gt_answer field", "skipped"),
    "gt_ambiguous": ("gt_answer matches two options", "skipped"),
    "gt_no_match": ("gt_answer matches no option", "skipped"),
    "duplicate_id": ("question_id already used by another record", "skipped"),
    "path_escape": ("image_path climbs out of the data root", "skipped"),
    "absolute_path": ("image_path is absolute", "skipped"),
}
# file-level faults: name -> (what is wrong, file content writer)
FILE_FAULTS = {
    "malformed_json": "a JSON syntax error",
    "truncated_json": "a JSON list cut off mid-record",
    "non_utf8": "text encoded as Latin-1, not UTF-8",
}
# model-output faults: name -> output text for a 4-option item whose answer is A
OUTPUT_FAULTS = {
    "no_answer_tag": "<think>the lesion is bright</think> The answer is A.",
    "two_answers": "<answer> A </answer> <answer> C </answer>",
    "letter_outside_options": "<answer> E </answer>",
    "empty_output": "",
}
HUGE_LIMIT = 250_000  # MAX_IMAGE_PIXELS during the run, so a 1000x1000 image counts as a bomb


def _record(qid: str, image: str, options=("yes", "no", "maybe", "unclear"), gt="yes", **changes) -> dict:
    rec = {"dataset": DATASET, "question_id": qid, "question_type": "Disease Diagnosis",
           "question": "Is there a lesion in this image?", "gt_answer": gt, "image_path": image,
           "modality_type": "CT(Computed Tomography)"}
    rec.update({f"option_{'ABCDEF'[i]}": o for i, o in enumerate(options)})
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


def inject(root: Path, size: int = 56) -> list[str]:
    """Write the faulty dataset files and images into an OmniMedVQA tree; returns the fault names in
    the order of their records in ``Faults.json``."""
    img_dir = root / "Images" / DATASET
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ok = f"Images/{DATASET}/ok.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / ok)
    (img_dir / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (img_dir / "empty.png").write_bytes(b"")
    Image.new("L", (1000, 1000)).save(img_dir / "huge.png")
    Image.fromarray((rng.integers(0, 65536, (size, size))).astype(np.uint16)).save(img_dir / "16bit.png")
    Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA").save(img_dir / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(img_dir / "gray.png")
    (root.parent / "outside.png").write_bytes((root / ok).read_bytes())

    recs = {
        "missing_image": _record("f_missing_image", f"Images/{DATASET}/nope.png"),
        "corrupt_image": _record("f_corrupt_image", f"Images/{DATASET}/corrupt.png"),
        "zero_byte_image": _record("f_zero_byte_image", f"Images/{DATASET}/empty.png"),
        "huge_image": _record("f_huge_image", f"Images/{DATASET}/huge.png"),
        "image_16bit": _record("f_image_16bit", f"Images/{DATASET}/16bit.png"),
        "image_rgba": _record("f_image_rgba", f"Images/{DATASET}/rgba.png"),
        "image_gray": _record("f_image_gray", f"Images/{DATASET}/gray.png"),
        "one_option": _record("f_one_option", ok, options=("yes",)),
        "six_options": _record("f_six_options", ok, options=("yes", "no", "a", "b", "c", "d")),
        "gt_absent": _record("f_gt_absent", ok, gt=None),
        "gt_ambiguous": _record("f_gt_ambiguous", ok, options=("yes", "Yes.", "no", "maybe")),
        "gt_no_match": _record("f_gt_no_match", ok, gt="absent"),
        "duplicate_id": _record("f_image_gray", ok),
        "path_escape": _record("f_path_escape", "Images/../../outside.png"),
        "absolute_path": _record("f_absolute_path", str((root / ok).resolve())),
    }
    qa = root / "QA_information" / "Open-access"
    (qa / f"{DATASET}.json").write_text(json.dumps(list(recs.values()), indent=1))
    good = json.dumps([_record("f_in_bad_file", ok)])
    (qa / "Faults-malformed.json").write_text(good.replace('",', '" ', 1))
    (qa / "Faults-truncated.json").write_text(good[: len(good) // 2])
    (qa / "Faults-latin1.json").write_bytes(good.replace("lesion", "lésion").encode("latin-1"))
    return list(recs)


@contextmanager
def _pixel_limit(n: int):
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = n
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def run(workdir: str | Path, *, n_images: int = 16, size: int = 56, vlm=None) -> tuple[pd.DataFrame, dict]:
    """Inject every fault, push everything through load -> images -> model -> answer parsing, and
    return (one row per injected fault with its outcome, totals). ``vlm``: a model to evaluate the
    loaded items with (default: an untrained tiny model); what it answers does not matter here,
    only that every loaded item comes out of evaluation with a row."""
    from . import base, evaluate, models

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    root = synth.make_benchmark(workdir / "OmniMedVQA", n_images=n_images, seed=0, size=size)
    order = inject(root, size)
    n_records = sum(len(json.loads(p.read_text())) for p in (root / "QA_information" / "Open-access").glob("Synth-*.json"))
    n_records += len(RECORD_FAULTS)

    with _pixel_limit(HUGE_LIMIT):
        res = data.load_omnimedvqa(root, strict=False, check_images="verify")
    loaded = {it.question_id: it for it in res}
    skipped = {s.index: s for s in res.skipped if Path(s.file).name == f"{DATASET}.json"}
    rows = []
    for index, name in enumerate(order):
        what, expected = RECORD_FAULTS[name]
        if index in skipped:
            outcome, detail = f"skipped ({skipped[index].kind})", skipped[index].reason
        elif f"f_{name}" in loaded:
            outcome, detail = "loaded", _image_note(loaded[f"f_{name}"], size)
        else:
            outcome, detail = "LOST", "in neither the loaded items nor the skip report"
        rows.append(dict(stage="record", fault=name, injected=what, expected=expected, outcome=outcome,
                         ok=outcome.startswith(expected), detail=detail))
    bad = {Path(f).name: reason for f, reason in res.bad_files}
    for name, what in FILE_FAULTS.items():
        fname = {"malformed_json": "Faults-malformed.json", "truncated_json": "Faults-truncated.json",
                 "non_utf8": "Faults-latin1.json"}[name]
        outcome = "file reported" if fname in bad else "LOST"
        rows.append(dict(stage="file", fault=name, injected=what, expected="file reported", outcome=outcome,
                         ok=fname in bad, detail=bad.get(fname, "")))

    if vlm is None:  # the tokenizer learns the benchmark's texts (the fault records have no scene)
        vlm = models.build_tiny_vlm(base.corpus_texts([it for it in res if it.dataset != DATASET]), seed=0,
                                    image_size=size)
    df = evaluate.evaluate(vlm, list(res), prompt="nothink", image_size=size, method="logprob", batch_size=16)
    item = next(it for it in res if len(it.options) == 4)
    for name, text in OUTPUT_FAULTS.items():
        pred = prompts.parse_answer(text, n_options=len(item.options))
        acc = prompts.accuracy_reward([text], answer=[item.answer], n_options=[len(item.options)])[0]
        rows.append(dict(stage="output", fault=name, injected=repr(text[:40]), expected="no valid answer",
                         outcome="no valid answer" if pred is None else f"parsed {pred}",
                         ok=pred is None and acc == 0.0, detail=f"accuracy reward {acc}"))

    table = pd.DataFrame(rows)
    totals = dict(records=res.n_records, expected_records=n_records, loaded=len(res), skipped=len(res.skipped),
                  unknown_modality=len(res.unknown_modality), bad_files=len(res.bad_files),
                  evaluated=len(df), faults=len(table), faults_as_expected=int(table["ok"].sum()))
    unaccounted = totals["expected_records"] - totals["loaded"] - totals["skipped"] - totals["unknown_modality"]
    not_evaluated = totals["loaded"] - totals["evaluated"]
    totals["lost"] = unaccounted + not_evaluated + int((table["outcome"] == "LOST").sum())
    return table, totals


def _image_note(item: data.VQAItem, size: int) -> str:
    x = data.load_image(item.image_path, size=size)
    return f"RGB {tuple(x.shape)}, range [{x.min():.2f}, {x.max():.2f}]"


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table, totals = run(Path(tmp) / "faults")
    print(table.drop(columns=["detail"]).to_markdown(index=False))
    print()
    print(" | ".join(f"{k}: {v}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
