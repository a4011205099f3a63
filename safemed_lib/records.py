"""Append-only JSONL records that survive `kill -9` and let long runs resume.

Every record carries a ``key``; a run asks :meth:`Records.done` which keys exist and skips them.
Each line is written and fsync'ed whole; a torn last line (the process died mid-write) is
dropped on reading and reported, and the file is truncated back to its last complete line
before new records are appended, so nothing is duplicated or half-written.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator


class Records:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw[: raw.rfind(b"\n") + 1]
            warnings.warn(f"{self.path}: dropped a torn last line ({len(raw) - len(keep)} bytes) "
                          "left by an interrupted run; that item will be recomputed")
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{lineno}: not a JSON record ({e})") from e

    def load(self) -> list[dict[str, Any]]:
        return list(self)

    def load_run(self, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The records already written, by key, after checking that each one was written with the
        same ``settings`` (a records file must never mix two runs)."""
        out = {}
        for rec in self:
            for k, v in settings.items():
                if rec.get(k) != v:
                    raise ValueError(f"{self.path}: record {rec.get('key')!r} has {k}={rec.get(k)!r} but this "
                                     f"run has {k}={v!r}; use another records_path")
            out[rec["key"]] = rec
        return out

    def done(self) -> set[str]:
        """Keys of the records already written."""
        return {r["key"] for r in self}

    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError("a record needs a 'key' field to be resumable")
        line = json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot store {type(x).__name__} in a JSON record")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a whole file atomically (temp file + rename): readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
