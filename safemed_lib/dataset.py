"""The profile's question sets: the embedded benchmark (generated once) or a local OmniMedVQA, split per image.

    train, test = dataset.splits(cfg)                 # the profile's per-image split (memoized)
    fit, val = dataset.validation(train, cfg)         # a validation split carved from train, per image
    train, test = dataset.splits(cfg, bench_seed=3)   # another benchmark, generated with seed 3

With ``data.omnimedvqa_root`` set, the local copy is read leniently (bad records are skipped and
reported by the loader); otherwise the embedded benchmark is generated under ``cfg.bench_dir``
once and read back strictly.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from . import data
from .paths import resolve

_CACHE: dict[tuple, tuple[list, list]] = {}


def load_items(omnimedvqa_root=None, bench_dir: str | Path = "data/bench/tiny", n_images: int = 1600,
               image_size: int = 112, seed: int = 0) -> list:
    """Every question of the local OmniMedVQA copy, or of the embedded benchmark (generated if missing)."""
    if omnimedvqa_root:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return list(data.load_omnimedvqa(resolve(omnimedvqa_root), strict=False))
    from . import synth

    root = synth.ensure_benchmark(resolve(bench_dir), n_images=n_images, seed=seed, size=image_size)
    return list(data.load_omnimedvqa(root, strict=True))


def splits(cfg, *, bench_seed: int | None = None) -> tuple[list, list]:
    """(train, test) of the profile, split per image with ``cfg.seed``; ``bench_seed`` generates
    another embedded benchmark (under ``<bench_dir>-seed<S>``) with that seed and splits it alike."""
    d = cfg.data
    if bench_seed is not None and d.omnimedvqa_root:
        raise ValueError("bench_seed generates an embedded benchmark; this profile reads OmniMedVQA "
                         f"({d.omnimedvqa_root})")
    bench_dir, gen_seed = cfg.bench_dir, cfg.seed
    if bench_seed is not None and bench_seed != cfg.seed:
        bench_dir, gen_seed = Path(f"{bench_dir}-seed{bench_seed}"), bench_seed
    key = (d.omnimedvqa_root, str(bench_dir), d.n_images, d.image_size, gen_seed, d.test_frac, cfg.seed)
    if key not in _CACHE:
        items = load_items(d.omnimedvqa_root, bench_dir, d.n_images, d.image_size, gen_seed)
        _CACHE[key] = data.split_by_image(items, test_frac=d.test_frac, seed=cfg.seed)
    train, test = _CACHE[key]
    return list(train), list(test)


def validation(train: list, cfg, frac: float = 0.2) -> tuple[list, list]:
    """(fit, validation): ``frac`` of the training images held out, per image (recipes are chosen on
    it; the test split is for the final table)."""
    return data.split_by_image(train, test_frac=frac, seed=cfg.seed + 1)
