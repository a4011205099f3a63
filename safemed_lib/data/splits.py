"""Per-image splits of VQAItems, the leakage check between splits, and count tables.

Splits are per image (every question about one image lands on the same side), unlike
Med-R1's per-question split, which leaks test images into training.
"""
from __future__ import annotations

import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Iterable, Sequence

import pandas as pd

from .items import MODALITIES, QUESTION_TYPES, DataError, VQAItem


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


def split_table(train: Sequence, test: Sequence):
    """Images and questions per modality in each split (a pandas DataFrame with a total row)."""
    rows = []
    for m in MODALITIES:
        tr = [i for i in train if i.modality == m]
        te = [i for i in test if i.modality == m]
        rows.append(dict(modality=m, train_images=len({str(i.image_path) for i in tr}),
                         test_images=len({str(i.image_path) for i in te}),
                         train_questions=len(tr), test_questions=len(te)))
    df = pd.DataFrame(rows).set_index("modality")
    df.loc["total"] = df.sum()
    return df
