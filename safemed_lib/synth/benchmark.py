"""The benchmark on disk: writing it (once, cached), and reading its scenes, stamp and digest back.

Layout written by :func:`make_benchmark` (what ``data.load_omnimedvqa`` reads)::

    <root>/Images/Synth-CT/Synth-CT_00000.png ...
    <root>/QA_information/Open-access/Synth-CT.json ...
    <root>/synth_scenes.json      # per-image generating parameters (ignored by the loader)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..records import atomic_write_text
from .drawing import render
from .scenes import DATASET, MODALITIES, _Bags, _make_record, _sample_scene, _sample_types

GENERATOR_VERSION = 2  # bump whenever the output changes: cached benchmarks regenerate
GRID = 28
SCENES_FILE = "synth_scenes.json"
STAMP_FILE = "synth_stamp.json"


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < GRID or size % GRID:
        raise ValueError(f"size must be a positive multiple of {GRID} (the Qwen2-VL pixel grid), "
                         f"got {size!r}")


def make_benchmark(out_dir: str | Path, n_images: int = 1600, seed: int = 0, size: int = 112, *,
                   questions_per_image: int = 2, real_frac: float = 0.3) -> Path:
    """Write the synthetic benchmark in OmniMedVQA's layout under ``out_dir``; returns the root.

    ``n_images`` images (modalities in turn, so each gets ``n_images / 8``), each with
    ``questions_per_image`` questions of distinct types; ``size`` (a multiple of 28) is the
    image side in pixels; ``real_frac`` is the share of images (in modalities with real
    images available) that get real-image fine texture. Same arguments, same bytes.
    ``out_dir`` must not exist or be empty. Also writes ``synth_scenes.json`` (see
    :func:`load_scenes`).
    """
    _check_size(size)
    if not isinstance(n_images, int) or n_images < len(MODALITIES):
        raise ValueError(f"n_images must be an int >= {len(MODALITIES)}, got {n_images!r}")
    if not 1 <= questions_per_image <= 3:
        raise ValueError(f"questions_per_image must be 1..3, got {questions_per_image}")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; make_benchmark writes into a fresh folder "
                              f"(use ensure_benchmark for a cached benchmark)")
    qa_dir = root / "QA_information" / "Open-access"
    qa_dir.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        (root / "Images" / DATASET[m]).mkdir(parents=True, exist_ok=True)
    positions = _Bags(np.random.default_rng([seed, 1]))
    answers = _Bags(np.random.default_rng([seed, 2]))
    records: dict[str, list[dict]] = {m: [] for m in MODALITIES}
    scenes: dict[str, dict] = {}
    for i in range(n_images):
        m = MODALITIES[i % len(MODALITIES)]
        j = i // len(MODALITIES)
        rng = np.random.default_rng([seed, 0, i])
        types = _sample_types(m, questions_per_image, rng)
        scene = _sample_scene(m, types, size, rng, answers)
        name = f"{DATASET[m]}_{j:05d}.png"
        rel = f"Images/{DATASET[m]}/{name}"
        scene["image"] = rel
        pixels = render(scene, rng, real_frac)
        Image.fromarray(pixels, "RGB").save(root / rel, optimize=False, compress_level=3)
        scenes[rel] = scene
        for t in types:
            qid = f"{DATASET[m]}_{len(records[m]):05d}"
            records[m].append(_make_record(scene, rel, t, qid, rng, positions))
    for m in MODALITIES:
        atomic_write_text(qa_dir / f"{DATASET[m]}.json", json.dumps(records[m], indent=1))
    atomic_write_text(root / SCENES_FILE, json.dumps(scenes, indent=None, sort_keys=True))
    return root


def load_scenes(root: str | Path) -> dict[str, dict]:
    """The per-image generating parameters, keyed by image path relative to the root
    (``"Images/Synth-CT/Synth-CT_00000.png"``)."""
    path = Path(root) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a root written by make_benchmark?")
    return json.loads(path.read_text(encoding="utf-8"))


def scene_of(item, scenes: dict[str, dict], root: str | Path) -> dict:
    """The scene of a loaded VQAItem (its image path made relative to ``root``)."""
    rel = Path(item.image_path).resolve().relative_to(Path(root).resolve()).as_posix()
    return scenes[rel]


def ensure_benchmark(bench_dir: str | Path, n_images: int = 1600, seed: int = 0, size: int = 112,
                     **kwargs) -> Path:
    """The benchmark root ``bench_dir/OmniMedVQA``, generated once and then reused.

    A stamp file records the parameters (and the generator version); with other parameters the
    benchmark is regenerated. Generation goes to a temporary sibling folder that is renamed into
    place only when complete, so an interrupted run never leaves a tree that looks finished.
    """
    _check_size(size)
    bench_dir = Path(bench_dir)
    root = bench_dir / "OmniMedVQA"
    params = dict(version=GENERATOR_VERSION, n_images=n_images, seed=seed, size=size,
                  **{k: kwargs[k] for k in sorted(kwargs)})
    if read_stamp(root) == params:
        return root
    bench_dir.mkdir(parents=True, exist_ok=True)
    tmp = bench_dir / f".OmniMedVQA.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        make_benchmark(tmp, n_images=n_images, seed=seed, size=size, **kwargs)
        atomic_write_text(tmp / STAMP_FILE, json.dumps(params, sort_keys=True))
        if root.exists():
            old = bench_dir / f".OmniMedVQA.old-{os.getpid()}-{time.time_ns()}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if read_stamp(root) != params:  # someone else won the race with other parameters
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_stamp(root: str | Path | None) -> dict | None:
    """The parameters a generated benchmark root was made with (n_images, seed, size, ...), or None."""
    if root is None:
        return None
    try:
        return json.loads((Path(root) / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def benchmark_digest(root: str | Path) -> str:
    """A SHA-256 over the QA JSON files, the scenes file and every image (for determinism checks)."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != STAMP_FILE)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()
