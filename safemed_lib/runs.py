"""The run cache: a piece of work done once per fingerprint of its settings and inputs, resumable.

Every cached thing in the workbook (the generated benchmark aside) is a *run*: a directory, a *key*
(a JSON-able dict of everything the result depends on: the config block, the ids of the training
items, the fingerprint of the model it starts from ...) and a function that does the work in that
directory. :func:`cached` calls the function at most once per key:

- ``<run_dir>/done.json`` records the same fingerprint: the work is done; its result is returned.
- ``<run_dir>/key.json`` records the same fingerprint but there is no ``done.json``: an earlier
  call was interrupted; the function is called again in the same directory and resumes from what
  it left there (SFT checkpoints, TRL checkpoints, JSONL records).
- anything else (another key, a foreign directory): the directory is emptied and the work starts afresh.

One ``done.json`` format: ``{"format", "fingerprint", "key", "result", "seconds", "finished"}``.
A lock file (``fcntl.flock``) serialises concurrent calls on one directory: a second process waits
for the first and then finds the run done (background training beside a notebook, pytest-xdist).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

from .records import atomic_write_text

FORMAT = 1
DONE, KEY, LOCK = "done.json", "key.json", ".lock"
T = TypeVar("T")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "model_dump"):  # a config block
        return x.model_dump()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot put {type(x).__name__} into a run key")


def fingerprint(key: Any) -> str:
    """A short, stable id of ``key`` (sha1 of its canonical JSON)."""
    return hashlib.sha1(_canonical(key).encode()).hexdigest()[:16]


def ids_digest(items) -> str:
    """A fingerprint of a list of items by their ``question_id`` (order-free): the training data of a key."""
    return hashlib.sha1("\n".join(sorted(it.question_id for it in items)).encode()).hexdigest()[:16]


def read_done(run_dir: str | Path) -> dict | None:
    """The ``done.json`` of a run directory, or None when the run has not finished."""
    try:
        done = json.loads((Path(run_dir) / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("format") == FORMAT else None


def is_done(run_dir: str | Path, key: Any) -> bool:
    done = read_done(run_dir)
    return done is not None and done.get("fingerprint") == fingerprint(key)


@contextmanager
def locked(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` (its parent folder holds the lock file)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}{LOCK}", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(run_dir: str | Path, key: Any, fn: Callable[[Path], Any], *,
           load: Callable[[Path, Any], T] | None = None) -> T | Any:
    """Do ``fn(run_dir)`` once per ``key`` and return its result (see the module doc).

    ``fn`` does the work inside ``run_dir`` and returns a JSON-able result (stored in ``done.json``)
    or None; it must resume from what an interrupted call left in ``run_dir``. ``load(run_dir,
    result)``, when given, turns a finished run into the object to return (e.g. a model loaded
    from ``run_dir / "model"``); without it the stored result is returned."""
    run_dir = Path(run_dir)
    fp = fingerprint(key)
    with locked(run_dir):
        done = read_done(run_dir)
        if done is None or done["fingerprint"] != fp:
            if done is not None or not _same_key(run_dir, fp):
                shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / KEY, json.dumps({"fingerprint": fp, "key": key}, indent=1,
                                                       default=_jsonable) + "\n")
            t0 = time.perf_counter()
            result = fn(run_dir)
            done = {"format": FORMAT, "fingerprint": fp, "key": json.loads(_canonical(key)), "result": result,
                    "seconds": round(time.perf_counter() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(run_dir / DONE, json.dumps(done, indent=1, default=_jsonable) + "\n")
        result = done["result"]
    return load(run_dir, result) if load is not None else result


def _same_key(run_dir: Path, fp: str) -> bool:
    try:
        return json.loads((run_dir / KEY).read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        return False

