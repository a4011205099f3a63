"""Stepwise cases built from synth's one-lesion scenes: answer spaces, distractors, splits.

Every answer is read off the scene's generating parameters; distractors come from the same
modality's answer space (a 2 x 2 grid of attribute values for localization and finding), and
answer positions are balanced per stage. :func:`benchmark_cases` gives a notebook its (train,
test) cases, from the embedded benchmark or from a stepwise JSON file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .. import data, synth
from .cases import (LETTERS, STAGE_QUESTION, STAGE_QUESTION_TYPE, STAGES, StageQuestion, StepwiseCase,
                    load_stepwise)


def region_space(modality: str) -> tuple[str, ...]:
    """All lesion-location answers of a modality: its named quadrants (MRI lobes, lung zones, ...),
    or "<anatomy>, <quadrant>" where the modality's anatomy question names an organ / body region."""
    s = synth.SPECS[modality]
    if s["ai"] == "location":
        return tuple(s["location"])
    return tuple(f"{a}, {q}" for a in s["anatomy"] for q in synth.QUADRANTS)


def region_of(scene: dict) -> str:
    """The lesion-location answer of a one-lesion scene."""
    s = synth.SPECS[scene["modality"]]
    quad = scene["lesions"][0]["quadrant"]
    if s["ai"] == "location":
        return s["location"][synth.QUADRANTS.index(quad)]
    return f"{scene['anatomy']}, {quad}"


def _finding_text(modality: str, style: str, grade: int) -> str:
    s = synth.SPECS[modality]
    return f"{synth.GRADE_WORD[grade - 1]} {synth.STYLE_CUE[style]} lesion ({s['grades'][grade - 1]})"


def finding_space(modality: str) -> tuple[str, ...]:
    """All finding descriptions of a modality: lesion look x size/grade."""
    styles = dict.fromkeys(synth.SPECS[modality]["style"].values())
    return tuple(_finding_text(modality, st, g) for st in styles for g in range(1, 5))


def finding_of(scene: dict) -> str:
    """The finding description (look, size word, grade) of a one-lesion scene."""
    return _finding_text(scene["modality"], scene["style"], scene["grade"])


def _distractors(stage: str, scene: dict, truth: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` wrong options for one stage, from the modality's answer space.

    Where an answer has two attributes (localization: organ x quadrant; finding: look x size) and
    four options are asked, the options are a 2 x 2 grid: the true value and one random other value
    of each attribute. Every option then shares one attribute with two others, so the truth is not
    the "centre" of the options (a text-only shortcut); otherwise distractors are uniform."""
    m = scene["modality"]
    s = synth.SPECS[m]
    if stage == "modality":
        pool = [synth.MODALITY_OPTION[x] for x in synth.MODALITIES if x != m]
    elif stage == "diagnosis":
        pool = [f for f in s["findings"] if f != scene["finding"]]
    elif stage == "localization":
        pool = [r for r in region_space(m) if r != truth]
        if s["ai"] == "anatomy" and n == 3:
            quad = scene["lesions"][0]["quadrant"]
            a2 = [a for a in s["anatomy"] if a != scene["anatomy"]]
            q2 = [q for q in synth.QUADRANTS if q != quad]
            a2, q2 = a2[int(rng.integers(len(a2)))], q2[int(rng.integers(len(q2)))]
            return [f"{scene['anatomy']}, {q2}", f"{a2}, {quad}", f"{a2}, {q2}"]
    elif stage == "finding":
        pool = [x for x in finding_space(m) if x != truth]
        if n == 3:
            st2 = [st for st in dict.fromkeys(s["style"].values()) if st != scene["style"]]
            g2 = [g for g in range(1, 5) if g != scene["grade"]]
            st2, g2 = st2[int(rng.integers(len(st2)))], g2[int(rng.integers(len(g2)))]
            return [_finding_text(m, scene["style"], g2), _finding_text(m, st2, scene["grade"]),
                    _finding_text(m, st2, g2)]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def case_from_scene(scene: dict, image_path: str | Path, *, case_id: str, positions: Sequence[int],
                    rng: np.random.Generator, n_options: int = 4) -> StepwiseCase:
    """The four-stage case of a one-lesion scene; ``positions[k]`` is the answer's option index
    at stage k; distractors are drawn with ``rng``."""
    if scene.get("count") != 1 or len(scene.get("lesions", ())) != 1:
        raise ValueError(f"scene {scene.get('image')}: stepwise cases need exactly one lesion, "
                         f"got count={scene.get('count')}")
    truths = {"modality": synth.MODALITY_OPTION[scene["modality"]], "localization": region_of(scene),
              "finding": finding_of(scene), "diagnosis": scene["finding"]}
    qs = []
    for k, stage in enumerate(STAGES):
        wrong = _distractors(stage, scene, truths[stage], n_options - 1, rng)
        if len(wrong) != n_options - 1:
            raise ValueError(f"scene {scene.get('image')}: only {len(wrong)} distractors for {stage}")
        pos = positions[k]
        opts = tuple(wrong[:pos] + [truths[stage]] + wrong[pos:])
        qs.append(StageQuestion(stage=stage, question=STAGE_QUESTION[stage], options=opts,
                                answer=LETTERS[pos], question_type=STAGE_QUESTION_TYPE[stage]))
    size = int(scene["size"])
    return StepwiseCase(case_id=case_id, dataset=scene["dataset"], image_path=Path(image_path).resolve(),
                        modality=scene["modality"], image_size=(size, size),
                        bbox=tuple(int(v) for v in scene["lesions"][0]["bbox"]), stages=tuple(qs))


def make_stepwise(bench_root: str | Path, items: Sequence[data.VQAItem] | None = None, *,
                  scenes: dict | None = None, seed: int = 0, n_options: int = 4,
                  max_cases: int | None = None) -> list[StepwiseCase]:
    """Stepwise cases for the embedded benchmark under ``bench_root``.

    One case per image that has exactly one lesion; with ``items`` only the images of those items
    (e.g. one side of ``data.split_by_image``, so the stepwise split follows the image split).
    ``scenes`` defaults to ``synth.load_scenes(bench_root)``. Answer positions are balanced per
    stage (shuffled bags of 0..n_options-1); ``max_cases`` keeps the first cases after a seeded
    shuffle stratified by modality (round robin). Same arguments, same cases.
    """
    if not 2 <= n_options <= 4:
        raise ValueError(f"n_options must be 2..4 (the smallest answer spaces have 4 values), got {n_options}")
    root = Path(bench_root).resolve()
    scenes = synth.load_scenes(root) if scenes is None else scenes
    if items is not None:
        wanted = {Path(it.image_path).resolve().relative_to(root).as_posix() for it in items}
        missing = sorted(wanted - set(scenes))
        if missing:
            raise ValueError(f"{len(missing)} item image(s) have no scene in {root} (e.g. {missing[0]})")
        rels = sorted(wanted)
    else:
        rels = sorted(scenes)
    rels = [r for r in rels if scenes[r].get("count") == 1 and len(scenes[r].get("lesions", ())) == 1]
    rng = np.random.default_rng([seed, 72])
    by_mod: dict[str, list[str]] = {}
    for i in rng.permutation(len(rels)):
        by_mod.setdefault(scenes[rels[i]]["modality"], []).append(rels[i])
    order = []
    while any(by_mod.values()):
        for m in data.MODALITIES:
            if by_mod.get(m):
                order.append(by_mod[m].pop(0))
    if max_cases is not None:
        order = order[:max_cases]
    bags: dict[int, list[int]] = {k: [] for k in range(len(STAGES))}
    cases = []
    for rel in order:
        positions = []
        for k in range(len(STAGES)):
            if not bags[k]:
                bags[k] = [int(i) for i in rng.permutation(n_options)]
            positions.append(bags[k].pop())
        cases.append(case_from_scene(scenes[rel], root / rel, case_id=Path(rel).stem, positions=positions,
                                     rng=rng, n_options=n_options))
    if not cases:
        raise ValueError(f"{root}: no one-lesion images among the {len(scenes) if items is None else len(wanted)}"
                         " candidates; nothing to build stepwise cases from")
    return cases


def split_cases(cases: Sequence[StepwiseCase], test_frac: float = 0.2, seed: int = 0
                ) -> tuple[list[StepwiseCase], list[StepwiseCase]]:
    """A seeded (train, test) split of cases, stratified by modality; every image lands on one side."""
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    by_image: dict[Path, list[StepwiseCase]] = {}
    for c in cases:
        by_image.setdefault(c.image_path, []).append(c)
    rng = np.random.default_rng([seed, 73])
    test_images: set[Path] = set()
    for m in sorted({c.modality for c in cases}):
        imgs = sorted({c.image_path for c in cases if c.modality == m})
        n_test = round(test_frac * len(imgs))
        test_images |= {imgs[i] for i in rng.permutation(len(imgs))[:n_test]}
    return ([c for c in cases if c.image_path not in test_images],
            [c for c in cases if c.image_path in test_images])


def benchmark_cases(bench_dir: str | Path, n_images: int, image_size: int, seed: int = 0, *,
                    stepwise_json: str | Path | None = None, image_root: str | Path | None = None,
                    test_frac: float = 0.2) -> tuple[list[StepwiseCase], list[StepwiseCase]]:
    """(train, test) stepwise cases for a notebook.

    With ``stepwise_json`` (e.g. a converted Med-R2 release) the file is loaded strictly with
    ``image_root`` and split by :func:`split_cases`. Otherwise the embedded benchmark
    (``synth.ensure_benchmark``, cached) gives the cases, split like its questions
    (``data.split_by_image`` with the same seed and ``test_frac``), so no test image of the
    stepwise benchmark was seen by the models fine-tuned on the benchmark's train split."""
    from ..paths import resolve

    if stepwise_json:
        if not image_root:
            raise ValueError("stepwise_json needs image_root (the folder its image paths are relative to)")
        return split_cases(load_stepwise(resolve(stepwise_json), resolve(image_root)), test_frac, seed)
    root = synth.ensure_benchmark(resolve(bench_dir), n_images=n_images, seed=seed, size=image_size)
    train, test = data.split_by_image(list(data.load_omnimedvqa(root)), test_frac=test_frac, seed=seed)
    return make_stepwise(root, train, seed=seed), make_stepwise(root, test, seed=seed)


def cases_for(cfg) -> tuple[list[StepwiseCase], list[StepwiseCase]]:
    """(train, test) cases of a profile: ``medr2.stepwise_json`` if given, else generated from the
    embedded benchmark of ``medr2.n_images`` images (0: ``data.n_images``)."""
    m = cfg.medr2
    n = m.n_images or cfg.data.n_images
    if n == cfg.data.n_images:  # the profile's own benchmark, split as the other notebooks split it
        folder, seed = cfg.bench_dir, cfg.seed
    else:
        # a folder of its own (never regenerate the benchmark the other notebooks read in place), drawn
        # with another seed: image i's scene comes from a generator seeded with (seed, i), so with the
        # profile's seed its first images would be the profile's, some of its test images ones the models
        # trained on
        folder, seed = cfg.bench_dir.with_name(f"{cfg.bench_dir.name}-medr2-{n}"), cfg.seed + 1
    return benchmark_cases(folder, n, cfg.data.image_size, seed, stepwise_json=m.stepwise_json,
                           image_root=m.image_root, test_frac=cfg.data.test_frac)
