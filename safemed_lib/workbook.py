"""The one-liners notebooks start from: the data set of the profile and its per-image split."""
from __future__ import annotations

import warnings

from . import data
from .paths import resolve


def dataset(omnimedvqa_root=None, bench_dir="data/bench/tiny", n_images=1600, image_size=112, seed=0,
            test_frac=0.2):
    """(train, test) lists of ``VQAItem``s, split per image with ``seed``.

    With ``omnimedvqa_root`` set, a local OmniMedVQA copy is read leniently (bad records are skipped
    and reported by the loader); otherwise the embedded benchmark is generated under ``bench_dir``
    once and read back strictly.
    """
    if omnimedvqa_root:
        root = resolve(omnimedvqa_root)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            items = data.load_omnimedvqa(root, strict=False)
    else:
        from . import synth

        root = synth.ensure_benchmark(resolve(bench_dir), n_images=n_images, seed=seed, size=image_size)
        items = data.load_omnimedvqa(root, strict=True)
    return data.split_by_image(list(items), test_frac=test_frac, seed=seed)
