"""SafeMed workbook library: data, models, attacks, training, smoothing, evaluation."""
from __future__ import annotations

import os

__version__ = "0.1.0"


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads deliberately.

    On a 2-core machine two torch threads under contention run 10-25x slower than one,
    so the default is one thread; ``SAFEMED_THREADS`` or the argument overrides it.
    """
    import torch

    if n is None:
        n = int(os.environ.get("SAFEMED_THREADS", "1"))
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
