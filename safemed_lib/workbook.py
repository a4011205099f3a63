"""What every notebook shares: the setup call, writing tables and figures, and work in a second process.

    cfg = workbook.setup(profile, overrides)          # the notebook's first code cell
    workbook.save_table(df, "05_robustness_overall")  # results/05_robustness_overall.csv and .md
    workbook.save_figure(fig, "05_clean_vs_pgd")      # figures/05_clean_vs_pgd.png
"""
from __future__ import annotations

import os
from typing import Sequence

from . import config
from .paths import FIGURES, RESULTS
from .records import atomic_write_text


def setup(profile: str = "tiny", overrides: dict | None = None, *, quiet: bool = False) -> config.Config:
    """Load the profile with its overrides (``config.load``), set torch's threads, make the output
    folders and silence per-model progress bars; returns the config and prints what it is."""
    from transformers.utils import logging as hf_logging

    from . import set_threads

    cfg = config.load(profile, overrides)
    set_threads(cfg.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()  # weight-loading bars, once per cached model
    FIGURES.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not quiet:
        given = f" with {overrides}" if overrides else ""
        print(f"profile {cfg.profile!r}{given}: {cfg.threads} thread(s), device {cfg.device}, "
              f"models in {cfg.models_dir}")
    return cfg


def save_table(df, name: str, *, title: str = "", note: str = "", index: bool = True, md: bool = True):
    """``results/<name>.csv`` (``df.to_csv``) and, with ``md``, ``results/<name>.md`` (a title, a note
    and the table as Markdown); returns ``df`` so that a cell can show it."""
    df.to_csv(RESULTS / f"{name}.csv", index=index)
    if md:
        save_markdown(name, [(title, note, df)], index=index)
    return df


def save_markdown(name: str, sections: Sequence[tuple[str, str, object]], *, index: bool = True) -> None:
    """``results/<name>.md`` from (heading, note, table) sections (empty parts are left out)."""
    parts = []
    for i, (heading, note, df) in enumerate(sections):
        if heading:
            parts.append(("# " if i == 0 else "## ") + heading)
        if note:
            parts.append(note)
        if df is not None:
            parts.append(df.to_markdown(index=index))
    atomic_write_text(RESULTS / f"{name}.md", "\n\n".join(parts) + "\n")


def save_figure(fig, name: str, *, dpi: int = 120, tight: bool = False):
    """``figures/<name>.png``; returns the figure."""
    fig.savefig(FIGURES / f"{name}.png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return fig


def _run_dropping_result(threads, fn, args, kwargs) -> None:
    from . import set_threads

    set_threads(threads)
    fn(*args, **kwargs)


def background(fn, *args, threads: int = 1, **kwargs):
    """Start ``fn(*args, **kwargs)`` in a fresh process with ``threads`` torch threads; returns a
    ``concurrent.futures.Future`` whose ``result()`` waits for it and re-raises its error.

    For training runs that cache their model on disk (``zoo.ensure``): the return value is dropped,
    so load the model afterwards (``zoo.load``). ``fn`` and its arguments must be picklable
    (module-level functions, ``functools.partial`` of them; no lambdas). On the 2-core default
    machine two single-threaded runs take the time of one. The worker shows no progress bars
    (``TQDM_DISABLE``); what ``fn`` prints still shows."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from unittest import mock

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    # The worker starts inside submit() and takes this environment; tqdm reads TQDM_DISABLE when
    # imported, which unpickling fn does: set it only around the start, so this process keeps its bars.
    with mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}):
        job = pool.submit(_run_dropping_result, threads, fn, args, kwargs)
    pool.shutdown(wait=False)  # the job still runs to its end; the worker exits after it
    return job
