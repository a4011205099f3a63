"""Training precision: fp32 master weights always, bf16 autocast for the compute on CUDA only.

Real checkpoints load in bf16 (``load_vlm``'s ``dtype="auto"``). An AdamW update at the workbook's
learning rates (1e-6 for GRPO, 2e-5 for SFT) is smaller than bf16's resolution (8 bits of mantissa:
a relative step of 2**-8) for most weights, so training bf16 weights in place rounds most updates
away. The training loops therefore upcast the weights to float32 first (what TRL does when it loads
a model itself) and run the forward pass under bf16 autocast where the hardware has it.
"""
from __future__ import annotations

import contextlib

import torch

HALF = (torch.bfloat16, torch.float16)


def master_weights(model: torch.nn.Module) -> int:
    """Upcast ``model``'s half-precision floating parameters and buffers to float32, in place;
    returns how many tensors were upcast (0 for a float32 model, which is left untouched)."""
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in HALF:
            t.data = t.data.float()
            n += 1
    return n


def autocast(device: torch.device | str):
    """bf16 autocast on a CUDA device that supports bf16; a no-op elsewhere (CPU trains in float32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
