"""Where things live: the project root and paths relative to it."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA = PROJECT_ROOT / "data"
FIGURES = PROJECT_ROOT / "figures"
RESULTS = PROJECT_ROOT / "results"
RUNS = PROJECT_ROOT / "runs"


def resolve(path: str | Path) -> Path:
    """An absolute path: relative paths are taken from the project root (not the cwd),
    so notebooks give the same answer wherever papermill or nbval runs them."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p)
