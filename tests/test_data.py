"""Tests for safemed_lib.data on small fixture trees in OmniMedVQA's and Med-R1's real formats."""
from __future__ import annotations

import copy
import json
import os
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safemed_lib import data as D
from safemed_lib.data import (MODALITIES, QUESTION_TYPES, DataError, DataWarning, VQAItem,
                              assert_no_leakage, counts, cross_splits, leakage_report,
                              load_image, load_images, load_medr1_split, load_omnimedvqa,
                              split_by_image)

# The eight verbatim OmniMedVQA modality_type strings (typos included) and their canonical names.
VERBATIM = {
    "CT(Computed Tomography)": "CT",
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "X-Ray": "X-Ray",
    "ultrasound": "Ultrasound",
    "Dermoscopy": "Dermoscopy",
    "Fundus Photography": "Fundus",
    "Microscopy Images": "Microscopy",
    "OCT (Optical Coherence Tomography": "OCT",
}


# ----------------------------------------------------------------------------- fixtures

def _png(path: Path, seed: int, size=(28, 28)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _rec(ds, i, modality, options, gt, qtype="Modality Recognition", key="modality_type",
         image=None):
    r = {"dataset": ds, "question_id": f"{ds}_{i:04d}", "question_type": qtype,
         "question": f"What is shown in image {i}?", "gt_answer": gt,
         "image_path": image or f"Images/{ds}/img_{i}.png"}
    r.update({f"option_{c}": o for c, o in zip("ABCDE", options)})
    r[key] = modality
    return r


def _base_records():
    """Three files covering every verbatim modality, 2/3/4/5 options, the `modality` key
    variant, gt_answer case / trailing-period / whitespace variants, and one `unknown`."""
    mods = list(VERBATIM)
    ds1 = [
        _rec("DS1", 0, mods[0], ["PET scan", "CT scan"], "ct scan."),                  # 2 options
        _rec("DS1", 1, mods[1], ["Blood test", "MRI", "Biopsy"], "  MRI "),          # 3 options
        _rec("DS1", 2, mods[2], ["X-ray", "PET", "CT", "Ultrasound"], "X-RAY",
             qtype="Anatomy Identification"),                                           # 4 options
        _rec("DS1", 3, mods[3], ["a", "b", "c", "d", "Ultrasound."], "ultrasound",
             qtype="Disease Diagnosis"),                                                # 5 options
        # a second question on image 3 (several questions per image)
        _rec("DS1", 4, mods[3], ["benign", "malignant"], "Benign", qtype="Lesion Grading",
             image="Images/DS1/img_3.png"),
    ]
    ds2 = [
        _rec("DS2", 0, mods[4], ["nevus", "melanoma"], "Melanoma.", qtype="Disease Diagnosis"),
        _rec("DS2", 1, mods[5], ["glaucoma", "normal"], "normal",
             qtype="Other Biological Attributes"),
        _rec("DS2", 2, mods[6], ["cell", "tissue"], "cell"),
        _rec("DS2", 3, mods[7], ["retina", "cornea"], "retina", qtype="Anatomy Identification"),
        _rec("DS2", 4, "unknown", ["a", "b"], "a"),
    ]
    chest = [_rec("Chest CT Scan", 0, mods[0], ["CT", "MRI"], "CT", key="modality")]
    return {"DS1": ds1, "DS2": ds2, "Chest CT Scan": chest}


def write_tree(root: Path, files: dict, images: bool = True) -> Path:
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    for name, recs in files.items():
        (qa / f"{name}.json").write_text(json.dumps(recs, indent=1))
        if images:
            for r in recs:
                p = root / r["image_path"]
                if ".." not in r["image_path"] and not Path(r["image_path"]).is_absolute() \
                        and not p.exists():
                    _png(p, seed=zlib.crc32(r["image_path"].encode()))
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "OmniMedVQA", _base_records())


N_BASE = 11  # records in _base_records


def _item(qid, img, modality="CT", qtype="Disease Diagnosis", n_opt=2):
    return VQAItem(question_id=qid, dataset="X", image_path=Path("/img") / img, question="q?",
                   options=[f"o{i}" for i in range(n_opt)], answer="A", modality=modality,
                   question_type=qtype)


# ----------------------------------------------------------------------------- OmniMedVQA

def test_load_valid_tree_maps_modalities_and_answers(tree):
    with pytest.warns(DataWarning, match="unknown_modality: 1"):
        items = load_omnimedvqa(tree)
    assert isinstance(items, list) and isinstance(items, D.LoadResult)
    assert len(items) == N_BASE - 1
    assert items.n_records == N_BASE and not items.skipped and not items.bad_files
    [unk] = items.unknown_modality
    assert (unk.file, unk.index, unk.question_id) == ("Open-access/DS2.json", 4, "DS2_0004")
    assert unk.record["modality_type"] == "unknown"
    by_id = {it.question_id: it for it in items}
    # every verbatim string maps to its canonical modality; raw string kept
    seen = {it.modality_raw: it.modality for it in items}
    assert seen == VERBATIM
    assert by_id["Chest CT Scan_0000"].modality == "CT"  # the `modality` key variant
    # gt_answer -> letter: case, trailing period, surrounding whitespace ignored
    assert [by_id[f"DS1_000{i}"].answer for i in range(5)] == ["B", "B", "A", "E", "A"]
    assert by_id["DS2_0000"].answer == "B"
    assert [len(by_id[f"DS1_000{i}"].options) for i in range(4)] == [2, 3, 4, 5]
    it = by_id["DS1_0002"]
    assert it.image_path.is_absolute() and it.image_path.is_file()
    assert it.image_path == (tree / "Images/DS1/img_2.png").absolute()
    assert it.question_type == "Anatomy Identification" and it.dataset == "DS1"
    assert it.source == "Open-access/DS1.json#2"
    assert by_id["DS1_0004"].image_path == by_id["DS1_0003"].image_path
    # files in name order, records in file order
    assert [i.question_id for i in items][:2] == ["Chest CT Scan_0000", "DS1_0000"]


def _set(file, index, **kv):
    def f(recs, root):
        recs[file][index].update(kv)
    return f


def _drop(file, index, key):
    def f(recs, root):
        del recs[file][index][key]
    return f


def _corrupt_image(recs, root):
    p = root / "Images/DS1/img_1.png"
    _png(p, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")


def _symlink_out(recs, root):
    outside = root.parent / "outside.png"
    _png(outside, 1)
    (root / "Images/DS1").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / "Images/DS1/link.png")
    recs["DS1"][1]["image_path"] = "Images/DS1/link.png"


def _duplicate_across_files(recs, root):
    recs["DS2"][1]["question_id"] = "DS1_0001"


def _not_object(recs, root):
    recs["DS1"][1] = ["not", "a", "dict"]


def _gap_options(recs, root):
    del recs["DS1"][3]["option_C"]


BAD_CASES = {
    # name: (mutation, file, index, kind, message fragment)
    "missing_field": (_drop("DS1", 1, "question"), "DS1", 1, "missing_field", "'question'"),
    "missing_modality": (_drop("DS1", 1, "modality_type"), "DS1", 1, "missing_field",
                         "modality_type"),
    "wrong_type": (_set("DS1", 1, option_B=3), "DS1", 1, "bad_type", "option_B"),
    "qid_not_str": (_set("DS1", 1, question_id=17), "DS1", 1, "bad_type", "question_id"),
    "no_match": (_set("DS1", 1, gt_answer="Ultrasound"), "DS1", 1, "answer_no_match",
                 "matches no option"),
    "ambiguous": (_set("DS1", 1, option_A="mri."), "DS1", 1, "answer_ambiguous",
                  "several options"),
    "one_option": (_drop("DS1", 0, "option_B"), "DS1", 0, "bad_options", "2 to 5"),
    "option_F": (_set("DS1", 3, option_F="f"), "DS1", 3, "bad_options", "option_F"),
    "gap": (_gap_options, "DS1", 3, "bad_options", "contiguous"),
    "bad_modality": (_set("DS1", 1, modality_type="MRI scan"), "DS1", 1, "bad_modality",
                     "MRI scan"),
    "bad_qtype": (_set("DS1", 1, question_type="Counting"), "DS1", 1, "bad_question_type",
                  "Counting"),
    "missing_image": (_set("DS1", 1, image_path="Images/DS1/nope.png"), "DS1", 1,
                      "missing_image", "nope.png"),
    "unreadable_image": (_corrupt_image, "DS1", 1, "unreadable_image", "cannot be read"),
    "dotdot": (_set("DS1", 1, image_path="Images/../../outside.png"), "DS1", 1, "path_escape",
               "'..'"),
    "absolute": (_set("DS1", 1, image_path="/etc/hostname"), "DS1", 1, "path_escape",
                 "absolute"),
    "symlink": (_symlink_out, "DS1", 1, "path_escape", "outside"),
    "duplicate": (_duplicate_across_files, "DS2", 1, "duplicate_id",
                  "first seen at Open-access/DS1.json#1"),
    "not_object": (_not_object, "DS1", 1, "bad_type", "JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_strict_and_lenient(tmp_path, case):
    mutate, file, index, kind, fragment = BAD_CASES[case]
    recs = _base_records()
    root = tmp_path / "OmniMedVQA"
    write_tree(root, recs)               # images of the good tree
    mutate(recs, root)
    write_tree(root, recs, images=False)  # rewrite the JSON with the bad record
    with pytest.raises(DataError) as ei, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        load_omnimedvqa(root, strict=True)
    e = ei.value
    assert (e.file, e.index, e.kind) == (f"Open-access/{file}.json", index, kind)
    assert f"{file}.json" in str(e) and f"record {index}" in str(e) and fragment in str(e)

    with pytest.warns(DataWarning, match=f"{kind}: 1"):
        res = load_omnimedvqa(root, strict=False)
    [s] = res.skipped
    assert (s.file, s.index, s.kind) == (f"Open-access/{file}.json", index, kind)
    assert fragment in s.reason
    assert len(res) == N_BASE - 2 and len(res.unknown_modality) == 1
    assert len(res) + len(res.skipped) + len(res.unknown_modality) == res.n_records == N_BASE
    rep = res.report()
    assert set(rep.status) == {"skipped", "unknown_modality"} and len(rep) == 2


def test_lenient_counts_several_reasons_and_bad_file(tmp_path):
    recs = _base_records()
    root = tmp_path / "OmniMedVQA"
    write_tree(root, recs)
    recs["DS1"][0]["gt_answer"] = "nothing like it"
    recs["DS1"][2]["image_path"] = "../x.png"
    recs["DS2"][0]["gt_answer"] = "also wrong"
    write_tree(root, recs, images=False)
    (root / "QA_information/Open-access/Broken.json").write_text('[{"dataset": "B",')
    with pytest.raises(DataError, match=r"Broken\.json: malformed JSON"):
        load_omnimedvqa(root, strict=True)
    with pytest.warns(DataWarning) as w:
        res = load_omnimedvqa(root, strict=False)
    assert len(w) == 1
    msg = str(w[0].message)
    for frag in ("answer_no_match: 2", "path_escape: 1", "unknown_modality: 1", "bad_files: 1",
                 f"loaded {N_BASE - 4} of {N_BASE}"):
        assert frag in msg
    assert res.summary() == {"loaded": N_BASE - 4, "records_read": N_BASE, "answer_no_match": 2,
                             "path_escape": 1, "unknown_modality": 1, "bad_files": 1}
    assert res.bad_files[0][0].endswith("Broken.json")
    assert len(res) + len(res.skipped) + len(res.unknown_modality) == res.n_records


def test_not_a_root_and_filters(tree, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_omnimedvqa(tmp_path / "nowhere")
    with pytest.raises(DataError, match="Restricted-access"):
        load_omnimedvqa(tree, access="Restricted-access")
    with pytest.raises(DataError, match="NOPE"):
        load_omnimedvqa(tree, datasets=["NOPE"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DS1 has no unknown record: no warning at all
        only = load_omnimedvqa(tree, datasets=["DS1"])
    assert {i.dataset for i in only} == {"DS1"} and len(only) == 5


def test_check_images_levels(tmp_path):
    recs = _base_records()
    root = write_tree(tmp_path / "OmniMedVQA", recs)
    p = root / "Images/DS1/img_1.png"
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])  # truncated: the header is fine, the data is not
    kw = dict(strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert not load_omnimedvqa(root, check_images="header", **kw).skipped
        assert not load_omnimedvqa(root, check_images="exists", **kw).skipped
        [s] = load_omnimedvqa(root, check_images="verify", **kw).skipped
        assert s.kind == "unreadable_image" and s.index == 1
        p.unlink()
        assert not load_omnimedvqa(root, check_images="none", **kw).skipped
        assert load_omnimedvqa(root, check_images="exists", **kw).skipped[0].kind == "missing_image"
    with pytest.raises(ValueError, match="check_images"):
        load_omnimedvqa(root, check_images="full")


@pytest.mark.parametrize("limit", [100, 500])  # 28x28 = 784: PIL's error (> 2x) and warning
def test_decompression_bomb_image_is_reported(tree, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match="too large"):
        load_omnimedvqa(tree, datasets=["DS1"])
    with pytest.raises(DataError, match="too large"):
        load_image(tree / "Images/DS1/img_0.png")


# ----------------------------------------------------------------------------- Med-R1

def _medr1(tree, tmp_path, records):
    p = tmp_path / "CT_train.json"
    p.write_text(json.dumps(records))
    return p


def test_medr1_split_with_reference(tree, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ref = load_omnimedvqa(tree)
    recs = [
        {"image": "Images/DS1/img_2.png",
         "problem": "What is shown in image 2? A)X-ray, B)PET, C)CT, D)Ultrasound",
         "solution": "<answer> A </answer>"},
        # options re-ordered w.r.t. OmniMedVQA: joined on the option set, answer text checked
        {"image": "Images/DS1/img_1.png",
         "problem": "What is shown in image 1?  A)MRI, B)Blood test, C)Biopsy",
         "solution": "<answer>A</answer>"},
    ]
    items = load_medr1_split(_medr1(tree, tmp_path, recs), tree, reference=ref)
    assert [i.question_id for i in items] == ["DS1_0002", "DS1_0001"]
    a, b = items
    assert (a.modality, a.question_type, a.answer) == ("X-Ray", "Anatomy Identification", "A")
    assert a.options == ["X-ray", "PET", "CT", "Ultrasound"] and a.question == "What is shown in image 2?"
    assert b.modality == "MRI" and b.answer_text == "MRI"
    assert a.image_path == (tree / "Images/DS1/img_2.png").absolute()

    # wrong answer w.r.t. the reference; no reference record; ids disagree -> errors
    bad = copy.deepcopy(recs)
    bad[1]["solution"] = "<answer> B </answer>"
    bad.append({"image": "Images/DS1/img_0.png", "problem": "Unseen question? A)x, B)y",
                "solution": "<answer> B </answer>"})
    p = _medr1(tree, tmp_path, bad)
    with pytest.raises(DataError, match=r"CT_train\.json: record 1 .*disagrees with reference"):
        load_medr1_split(p, tree, reference=ref)
    with pytest.warns(DataWarning, match="no_reference: 1"):
        res = load_medr1_split(p, tree, reference=ref, strict=False)
    assert [s.kind for s in res.skipped] == ["reference_mismatch", "no_reference"]
    assert len(res) == 1 and res.n_records == 3
    with pytest.raises(DataError, match="reference .* says 'X-Ray'"):
        load_medr1_split(_medr1(tree, tmp_path, recs[:1]), tree, reference=ref, modality="CT")


def test_medr1_split_without_reference(tree, tmp_path):
    recs = [
        {"image": "Images/MIAS/mdb084.png",
         "problem": "What imaging technique was used? A)X-ray, B)MRI, C)Echocardiogram, "
                    "D)Mammography", "solution": "<answer> D </answer>"},
        {"image": "Images/Chest CT Scan/test/a (9).png",
         "problem": "Which test? A)Mammogram, B)Positron emission tomography (PET), C)CT, "
                    "D)Fluoroscopy, E)None", "solution": "<answer> C </answer>"},
    ]
    _png(tree / recs[0]["image"], 3)
    _png(tree / recs[1]["image"], 4)
    p = _medr1(tree, tmp_path, recs)
    with pytest.raises(DataError, match="reference=.*modality="):
        load_medr1_split(p, tree)
    items = load_medr1_split(p, tree, modality="X-Ray", question_type="Modality Recognition")
    a, b = items
    assert a.options == ["X-ray", "MRI", "Echocardiogram", "Mammography"] and a.answer == "D"
    assert (a.question_id, a.dataset, a.modality) == ("CT_train_00000", "MIAS", "X-Ray")
    assert b.options[1] == "Positron emission tomography (PET)" and len(b.options) == 5
    assert b.dataset == "Chest CT Scan" and b.answer_text == "CT"

    bad = copy.deepcopy(recs)
    bad[0]["solution"] = "D"
    bad[1]["solution"] = "<answer> E </answer>"
    bad[1]["problem"] = "Which test? A)x, B)y"
    bad.append({"image": "../Images/MIAS/mdb084.png", "problem": "Q? A)x, B)y",
                "solution": "<answer> A </answer>"})
    bad.append({"image": "Images/MIAS/mdb084.png", "problem": "No options here",
                "solution": "<answer> A </answer>"})
    p = _medr1(tree, tmp_path, bad)
    kw = dict(modality="X-Ray", question_type="Modality Recognition")
    with pytest.raises(DataError, match=r"record 0 .*'<answer> LETTER </answer>'"):
        load_medr1_split(p, tree, **kw)
    with pytest.warns(DataWarning):
        res = load_medr1_split(p, tree, strict=False, **kw)
    assert [s.kind for s in res.skipped] == ["bad_answer", "answer_no_match", "path_escape",
                                             "bad_options"]
    assert len(res) == 0 and res.n_records == 4


def test_parse_medr1_problem():
    q, o = D.parse_medr1_problem("Is it a)benign? A)yes, really, B)no")
    assert q == "Is it a)benign?" and o == ["yes, really", "no"]
    with pytest.raises(ValueError):
        D.parse_medr1_problem("A)only one")


# ----------------------------------------------------------------------------- images

def _save(tmp_path, name, im):
    p = tmp_path / name
    im.save(p)
    return p


def test_load_image_modes(tmp_path):
    g = np.arange(56 * 56, dtype=np.int64).reshape(56, 56)
    # L
    x = load_image(_save(tmp_path, "l.png", Image.fromarray((g % 256).astype(np.uint8))))
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy((g % 256) / 255.0).float())
    assert torch.equal(x[0], x[2])
    # I;16: scaled by 65535, not clipped at 255
    a16 = (g * 20).astype(np.uint16)
    p16 = _save(tmp_path, "i16.png", Image.fromarray(a16))
    assert Image.open(p16).mode in ("I;16", "I")
    x = load_image(p16)
    assert torch.allclose(x[1], torch.from_numpy(a16 / 65535.0).float(), atol=1e-6)
    assert 0.9 < x.max() <= 1.0
    assert load_image(p16, size=28).shape == (3, 28, 28)
    # RGBA composited on black: rgb * alpha
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    x = load_image(_save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert torch.allclose(x[0], torch.full((56, 56), round(200 * 128 / 255) / 255))
    assert x[1:].abs().max() == 0
    # LA too
    la = Image.fromarray(np.stack([np.full((28, 28), 255, np.uint8),
                                   np.zeros((28, 28), np.uint8)], -1), "LA")
    assert load_image(_save(tmp_path, "la.png", la)).max() == 0
    # P, with and without a transparent colour
    pal = Image.fromarray((g % 4).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    x = load_image(_save(tmp_path, "p.png", pal))
    assert x[:, 0, 1].tolist() == [1.0, 0.0, 0.0] and x[:, 0, 3].tolist() == [0.0, 0.0, 1.0]
    pal.info["transparency"] = 1
    x = load_image(_save(tmp_path, "pt.png", pal))
    assert x[:, 0, 1].tolist() == [0.0, 0.0, 0.0] and x[:, 0, 2].tolist() == [0.0, 1.0, 0.0]
    # CMYK (JPEG) and RGB
    cmyk = Image.new("CMYK", (28, 28), (0, 255, 255, 0))  # red
    x = load_image(_save(tmp_path, "c.jpg", cmyk))
    assert x[0].mean() > 0.9 and x[1:].mean() < 0.1


def test_load_image_grid_and_size(tmp_path):
    p = tmp_path / "off.png"
    _png(p, 0, size=(50, 30))
    with pytest.raises(DataError, match=r"50x30, not on the 28-pixel grid; pass size="):
        load_image(p)
    x = load_image(p, size=56)
    assert x.shape == (3, 56, 56) and 0 <= x.min() and x.max() <= 1
    assert load_image(p, grid=None).shape == (3, 30, 50)
    with pytest.raises(DataError, match="384 is not a multiple of 28.*392"):
        load_image(p, size=384)
    with pytest.raises(DataError, match="positive int"):
        load_image(p, size=0)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot be read"):
        load_image(tmp_path / "junk.png")
    # size=None keeps the pixels exactly
    q = tmp_path / "on.png"
    _png(q, 1, size=(28, 56))
    x = load_image(q)
    assert torch.equal((x * 255).round().byte().permute(1, 2, 0),
                       torch.from_numpy(np.array(Image.open(q))))


def test_load_images_batch(tree):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        items = load_omnimedvqa(tree)[:3]
    x = load_images(items, 28)
    assert x.shape == (3, 3, 28, 28)
    assert torch.equal(x[1], load_image(items[1].image_path, 28))
    _png(tree / "Images/big.png", 0, size=(56, 56))
    with pytest.raises(DataError, match="different shapes"):
        load_images([items[0].image_path, tree / "Images/big.png"], None)


# ----------------------------------------------------------------------------- splits

def _population(seed=0, n_images=400):
    """Items over many images; some images carry several questions of different types."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_images):
        m = MODALITIES[rng.integers(len(MODALITIES))]
        for j in range(1 + int(rng.integers(3))):
            q = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))] if j else QUESTION_TYPES[i % 3]
            items.append(_item(f"q{i}_{j}", f"img{i}.png", modality=m, qtype=q))
    return items


def test_split_by_image_grouped_deterministic_stratified():
    items = _population()
    train, test = split_by_image(items, test_frac=0.2, seed=0)
    assert len(train) + len(test) == len(items)
    assert {i.question_id for i in train}.isdisjoint({i.question_id for i in test})
    assert leakage_report(train=train, test=test).empty
    n_img = len({i.image_path for i in items})
    assert len({i.image_path for i in test}) == round(0.2 * n_img)
    # deterministic for a seed, independent of input order, different for another seed
    again = split_by_image(list(reversed(items)), test_frac=0.2, seed=0)[1]
    assert {i.question_id for i in again} == {i.question_id for i in test}
    other = split_by_image(items, test_frac=0.2, seed=1)[1]
    assert {i.question_id for i in other} != {i.question_id for i in test}
    # stratified: each modality's share of test images within a couple of images of 20%
    img_mod = {i.image_path: i.modality for i in items}
    test_imgs = {i.image_path for i in test}
    for m in MODALITIES:
        imgs = [p for p, mm in img_mod.items() if mm == m]
        assert abs(sum(p in test_imgs for p in imgs) - 0.2 * len(imgs)) <= 2.0, m
    # input order kept
    assert train == [i for i in items if i in train]
    with pytest.raises(ValueError):
        split_by_image(items, test_frac=1.0)
    with pytest.raises(DataError, match="at least 2 images"):
        split_by_image(items[:1])


def test_split_small_strata_still_reach_test():
    # 10 strata of 2 images each: per-stratum rounding alone would put nothing in test
    items = [_item(f"q{m}{k}", f"{m}_{k}.png", modality=MODALITIES[m % 8],
                   qtype=QUESTION_TYPES[m % 5]) for m in range(10) for k in range(2)]
    train, test = split_by_image(items, test_frac=0.2, seed=3)
    assert len(test) == 4 and len(train) == 16
    assert len({(i.modality, i.question_type) for i in test}) == 4  # from 4 different strata


def test_cross_splits_and_leakage():
    items = _population(1, 200)
    train, test = split_by_image(items, seed=0)
    cs = cross_splits(train, test, by="modality")
    assert list(cs) == [m for m in MODALITIES if any(i.modality == m for i in train)]
    for m, (tr, te) in cs.items():
        assert tr and all(i.modality == m for i in tr) and te == test
    assert sum(len(tr) for tr, _ in cs.values()) == len(train)
    ct = cross_splits(train, test, by="question_type")
    assert set(ct) <= set(QUESTION_TYPES) and sum(len(tr) for tr, _ in ct.values()) == len(train)
    with pytest.raises(ValueError):
        cross_splits(train, test, by="dataset")
    # inject a leak: one test image's question also in train
    leak = test[0]
    dup = _item("leaked", leak.image_path.name, modality=leak.modality)
    rep = leakage_report(train=train + [dup], test=test, val=[dup])
    assert set(map(tuple, rep[["split_a", "split_b"]].values)) == {("train", "test"),
                                                                    ("train", "val"),
                                                                    ("test", "val")}
    row = rep[(rep.split_a == "train") & (rep.split_b == "test")].iloc[0]
    assert row.image_path == str(leak.image_path) and row.n_a == 1
    assert row.n_b == sum(i.image_path == leak.image_path for i in test)
    with pytest.raises(DataError, match="leakage"):
        assert_no_leakage(train=train + [dup], test=test)
    with pytest.raises(DataError, match="leakage"):
        cross_splits(train + [dup], test)
    assert_no_leakage(train=train, test=test)  # clean: no error


def test_counts_and_frame():
    items = [_item("a", "1.png", "CT", "Disease Diagnosis"),
             _item("b", "1.png", "CT", "Disease Diagnosis"),
             _item("c", "2.png", "OCT", "Lesion Grading")]
    t = counts(items)
    assert t.shape == (8, 5) and list(t.index) == list(MODALITIES)
    assert t.loc["CT", "Disease Diagnosis"] == 2 and t.loc["OCT", "Lesion Grading"] == 1
    assert t.values.sum() == 3
    assert counts(items, unit="images").loc["CT", "Disease Diagnosis"] == 1
    f = D.to_frame(items)
    assert list(f.question_id) == ["a", "b", "c"] and f.image_path[0] == "/img/1.png"


def test_vqaitem_contract():
    with pytest.raises(DataError, match="absolute"):
        VQAItem("q", "d", Path("rel.png"), "q?", ["a", "b"], "A", "CT", "Disease Diagnosis")
    with pytest.raises(DataError, match="modality"):
        _item("q", "x.png", modality="PET")
    with pytest.raises(DataError, match="question_type"):
        _item("q", "x.png", qtype="Counting")
    with pytest.raises(DataError, match="2 to 5"):
        _item("q", "x.png", n_opt=6)
    with pytest.raises(DataError, match="answer"):
        VQAItem("q", "d", Path("/x.png"), "q?", ["a", "b"], "C", "CT", "Disease Diagnosis")
    assert isinstance(DataError("x"), ValueError)
    assert Counter(D.OMNIMEDVQA_MODALITY[s] for s in VERBATIM) == Counter(MODALITIES)
