"""Where things live: the project root and paths relative to it.

Figures and tables go to ``figures/`` and ``results/``. A test run sets ``SAFEMED_OUTPUT_DIR``
(``make test`` uses ``runs/nbval/outputs``) so that its smoke-profile outputs never overwrite the
reference outputs of the ``tiny`` run that are kept in the repository.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve(path: str | Path) -> Path:
    """An absolute path: relative paths are taken from the project root (not the cwd),
    so notebooks give the same answer wherever papermill or nbval runs them."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p)


_OUTPUT_DIR = os.environ.get("SAFEMED_OUTPUT_DIR")
_OUT = resolve(_OUTPUT_DIR) if _OUTPUT_DIR else PROJECT_ROOT
DATA = PROJECT_ROOT / "data"
FIGURES = _OUT / "figures"
RESULTS = _OUT / "results"
RUNS = PROJECT_ROOT / "runs"
