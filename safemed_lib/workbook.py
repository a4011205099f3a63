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


def _run_dropping_result(threads, fn, args, kwargs) -> None:
    from . import set_threads

    set_threads(threads)
    fn(*args, **kwargs)


def background(fn, *args, threads: int = 1, **kwargs):
    """Start ``fn(*args, **kwargs)`` in a fresh process with ``threads`` torch threads; returns a
    ``concurrent.futures.Future`` whose ``result()`` waits for it and re-raises its error.

    For training runs that cache their model on disk (``sft.ensure_*``, ``grpo.ensure_grpo``):
    the return value is dropped, so load the model afterwards with the same call. ``fn`` and its
    arguments must be picklable (module-level functions, ``functools.partial`` of them; no
    lambdas). On the 2-core default machine two single-threaded runs take the time of one. The
    worker shows no progress bars (``TQDM_DISABLE``); what ``fn`` prints still shows."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from unittest import mock

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    # The worker starts inside submit() and takes this environment; tqdm reads TQDM_DISABLE when
    # imported, which unpickling fn does: set it only around the start, so this process keeps its bars.
    with mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}):
        job = pool.submit(_run_dropping_result, threads, fn, args, kwargs)
    pool.shutdown(wait=False)  # the job still runs to its end; the worker exits after it
    return job
