"""Tests of the embedded benchmark generator (safemed_lib.synth), read back through safemed_lib.data."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safemed_lib import baselines, data, synth

N = 160  # 20 images per modality, 320 questions


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = synth.make_benchmark(tmp_path_factory.mktemp("b") / "root", n_images=N, seed=0, size=56)
    items = list(data.load_omnimedvqa(root, strict=True, check_images="verify"))
    return root, items, synth.load_scenes(root)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A moderate set for the statistical checks (800 images, 1600 questions)."""
    root = synth.make_benchmark(tmp_path_factory.mktemp("big") / "root", n_images=800, seed=3,
                                size=56, real_frac=0.0)
    return root, list(data.load_omnimedvqa(root, strict=True, check_images="none"))


def test_layout_and_record_format(bench):
    root, items, scenes = bench
    assert len(items) == 2 * N
    qa = sorted((root / "QA_information" / "Open-access").glob("*.json"))
    assert [p.stem for p in qa] == sorted(synth.DATASET.values())
    raw = json.loads(qa[0].read_text())
    rec = raw[0]
    assert list(rec)[:6] == ["dataset", "question_id", "question_type", "question", "gt_answer",
                             "image_path"]
    assert rec["image_path"].startswith("Images/") and (root / rec["image_path"]).is_file()
    assert rec["gt_answer"] in [rec[k] for k in rec if k.startswith("option_")]
    raw_modalities = {json.loads(p.read_text())[0]["modality_type"] for p in qa}
    assert raw_modalities == set(synth.MODALITY_TYPE.values())
    assert "OCT (Optical Coherence Tomography" in raw_modalities  # the typo, verbatim
    assert "MR (Mag-netic Resonance Imaging)" in raw_modalities
    assert len(scenes) == N and all(p.startswith("Images/") for p in scenes)
    assert {Path(it.image_path).relative_to(root).as_posix() for it in items} == set(scenes)


def test_all_modalities_types_and_option_counts(big):
    _, items = big
    cells = Counter((it.modality, it.question_type) for it in items)
    for m in data.MODALITIES:
        for q in data.QUESTION_TYPES:
            assert cells[(m, q)] >= 5, (m, q, cells[(m, q)])
    n_opts = Counter(len(it.options) for it in items)
    assert set(n_opts) == {2, 3, 4, 5}
    assert n_opts[4] > 0.5 * len(items)


def test_answer_letters_balanced(big):
    _, items = big
    for n in (2, 3, 4):
        letters = Counter(it.answer for it in items if len(it.options) == n)
        total = sum(letters.values())
        assert set(letters) == set("ABCDE"[:n])
        assert max(letters.values()) - min(letters.values()) <= max(2, 0.02 * total)


def test_answers_uniform_within_each_question(big):
    _, items = big
    groups: dict = {}
    for it in items:
        groups.setdefault((it.modality, it.question_type), Counter())[it.answer_text] += 1
    for (m, q), c in groups.items():
        if q == "Modality Recognition":
            continue
        space = synth.answer_space(m, q)
        assert set(c) <= set(space)
        assert max(c.values()) - min(c[v] for v in space) <= 2, (m, q, c)


def test_options_distinct_and_from_the_answer_space(bench):
    _, items, _ = bench
    for it in items:
        assert len(set(it.options)) == len(it.options)
        space = synth.answer_space(it.modality, it.question_type)
        assert set(it.options) <= set(space)


def test_images_on_grid_and_rgb(bench):
    root, items, _ = bench
    for it in items[:40]:
        im = Image.open(it.image_path)
        assert im.mode == "RGB" and im.size == (56, 56)
        assert data.load_image(it.image_path).shape == (3, 56, 56)
    with pytest.raises(ValueError, match="multiple of 28"):
        synth.make_benchmark(root.parent / "bad", n_images=16, size=100)


def test_answers_match_scene_metadata(bench):
    root, items, scenes = bench
    for it in items:
        sc = synth.scene_of(it, scenes, root)
        assert sc["modality"] == it.modality
        assert synth.answer_for(sc, it.question_type) == it.answer_text
        if it.question_type == "Disease Diagnosis":
            assert it.answer_text == sc["finding"]
        if it.question_type == "Lesion Grading":
            assert sc["lesions"] and sc["grade_name"] == it.answer_text
        if it.question_type == "Other Biological Attributes" and \
                synth.SPECS[it.modality]["oba"] == "count":
            assert synth.COUNT_WORDS.index(it.answer_text) + 1 == len(sc["lesions"])


def test_scene_geometry_is_what_the_answers_say(bench):
    _, _, scenes = bench
    for sc in scenes.values():
        size = sc["size"]
        assert sc["count"] == len(sc["lesions"])
        if not sc["lesions"]:
            assert sc["bbox"] is None and sc["grade"] is None
        quads = [les["quadrant"] for les in sc["lesions"]]
        assert len(set(quads)) == len(quads)
        for les in sc["lesions"]:
            x0, y0, x1, y1 = les["bbox"]
            cx, cy = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size
            assert ("left" in les["quadrant"]) == (cx < 0.5)
            assert ("upper" in les["quadrant"]) == (cy < 0.5)
            # the size grade is the radius bin: bins do not overlap
            r = les["r"]
            assert abs(r / synth.GRADE_RADIUS[sc["grade"] - 1] - 1) <= 0.07


def test_lesion_pixels_carry_the_finding(bench):
    """Bright lesions are bright and dark lesions are dark at their centre, in the pixels."""
    root, _, scenes = bench
    checked = Counter()
    for rel, sc in scenes.items():
        if sc["modality"] not in ("CT", "MRI", "X-Ray", "Ultrasound", "OCT") or not sc["lesions"]:
            continue
        a = np.asarray(Image.open(root / rel), np.float32).mean(-1) / 255
        les = sc["lesions"][0]
        y, x = int(les["cy"] * sc["size"]), int(les["cx"] * sc["size"])
        v = a[y - 1:y + 2, x - 1:x + 2].mean()
        if sc["style"] == "bright":
            assert v > 0.8, (rel, v)
        elif sc["style"] == "dark":
            assert v < 0.2, (rel, v)
        checked[sc["style"]] += 1
    assert checked["bright"] and checked["dark"]


def test_grades_grow_with_lesion_area(bench):
    _, _, scenes = bench
    areas = {g: [] for g in (1, 2, 3, 4)}
    for sc in scenes.values():
        for les in sc["lesions"]:
            x0, y0, x1, y1 = les["bbox"]
            areas[sc["grade"]].append((x1 - x0) * (y1 - y0))
    means = [np.mean(areas[g]) for g in (1, 2, 3, 4)]
    assert means == sorted(means) and means[3] > 4 * means[0]


def test_deterministic(tmp_path):
    a = synth.make_benchmark(tmp_path / "a", n_images=24, seed=5, size=56)
    b = synth.make_benchmark(tmp_path / "b", n_images=24, seed=5, size=56)
    c = synth.make_benchmark(tmp_path / "c", n_images=24, seed=6, size=56)
    assert synth.benchmark_digest(a) == synth.benchmark_digest(b)
    assert synth.benchmark_digest(a) != synth.benchmark_digest(c)
    with pytest.raises(FileExistsError):
        synth.make_benchmark(a, n_images=24, seed=5, size=56)


def test_rationale(bench):
    root, items, scenes = bench
    for it in items:
        sc = synth.scene_of(it, scenes, root)
        text = synth.rationale(it, sc)
        assert 1 <= text.count(".") <= 4 and text.endswith(".")
        assert it.answer_text in text
    it = next(i for i in items if i.question_type == "Disease Diagnosis")
    other = next(s for s in scenes.values()
                 if s["modality"] == it.modality and s["finding"] != it.answer_text)
    with pytest.raises(ValueError, match="answer"):
        synth.rationale(it, other)


def test_text_only_baseline_near_chance(big):
    _, items = big
    train, test = data.split_by_image(items, test_frac=0.3, seed=0)
    acc = baselines.text_only_baseline(train, test)
    chance = baselines.chance_level(test)
    assert abs(acc - chance) < 0.06, (acc, chance)


def test_text_only_baseline_detects_a_text_leak(big):
    """The baseline is not blind: when the answer is always option A it finds that."""
    _, items = big
    leaky = []
    for it in items:
        k = "ABCDE".index(it.answer)
        opts = [it.options[k]] + it.options[:k] + it.options[k + 1:]
        leaky.append(data.VQAItem(it.question_id, it.dataset, it.image_path, it.question, opts,
                                  "A", it.modality, it.question_type))
    train, test = data.split_by_image(leaky, test_frac=0.3, seed=0)
    assert baselines.text_only_baseline(train, test) > 0.95


def test_ensure_benchmark_caches_and_regenerates(tmp_path):
    root = synth.ensure_benchmark(tmp_path, n_images=16, seed=0, size=56)
    assert root == tmp_path / "OmniMedVQA"
    digest = synth.benchmark_digest(root)
    mtime = (root / synth.STAMP_FILE).stat().st_mtime_ns
    assert synth.ensure_benchmark(tmp_path, n_images=16, seed=0, size=56) == root
    assert (root / synth.STAMP_FILE).stat().st_mtime_ns == mtime  # cached, not rewritten
    root2 = synth.ensure_benchmark(tmp_path, n_images=24, seed=0, size=56)
    assert root2 == root and len(synth.load_scenes(root)) == 24
    assert synth.benchmark_digest(root) != digest
    assert [p.name for p in tmp_path.iterdir()] == ["OmniMedVQA"]  # no temp folders left


def test_ensure_benchmark_ignores_a_half_written_tree(tmp_path):
    root = tmp_path / "OmniMedVQA"
    (root / "QA_information" / "Open-access").mkdir(parents=True)  # interrupted, no stamp
    out = synth.ensure_benchmark(tmp_path, n_images=16, seed=0, size=56)
    assert len(data.load_omnimedvqa(out)) == 32


def test_real_textures_recorded(bench):
    _, _, scenes = bench
    avail = synth.real_sources_available()
    used = {sc["real_texture"] for sc in scenes.values()} - {None}
    names = {n for v in avail.values() for n in v}
    assert used <= names
    if names:
        assert used
