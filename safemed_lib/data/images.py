"""Image loading: any PIL image file as a float (3, H, W) tensor in [0, 1], singly or as a batch."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .items import DataError, VQAItem


def _open_image(path: Path) -> Image.Image:
    """Open and decode ``path``; decompression bombs and unreadable files -> DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} is too large to load safely ({e}); PIL's limit is "
                        f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}") from None
    except Exception as e:
        raise DataError(f"image {path} cannot be read by PIL: {type(e).__name__}: {e}") from None
    return im


def _to_rgb_or_float(im: Image.Image, path: Path) -> Image.Image:
    """An 8-bit ``RGB`` image, or a grey ``F`` image in [0, 1] for high-bit-depth input.

    - 16-bit greyscale (``I;16*``, or ``I`` with values in 0..65535) is divided by 65535
      (the container's range; PIL's own ``convert("RGB")`` would clip it at 255);
      ``F`` must already lie in [0, 1].
    - Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited
      on black, the background of most medical modalities: rgb * alpha.
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...) goes
      through PIL's ``convert("RGB")``.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            lo, hi, scale = 0.0, 1.0, 1.0
        else:
            lo, hi, scale = 0.0, 65535.0, 65535.0
        if a.size and (a.min() < lo or a.max() > hi):
            raise DataError(f"image {path}: mode {mode} values span [{a.min()}, {a.max()}], "
                            f"outside the supported range [{lo}, {hi}]")
        return Image.fromarray((a / scale).astype(np.float32), mode="F")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    return im if mode == "RGB" else im.convert("RGB")


def load_image(path: str | Path, size: int | None = None, *, grid: int | None = 28
               ) -> torch.Tensor:
    """Read an image as a float tensor (3, H, W) in [0, 1] (RGB).

    Any PIL mode is accepted (see ``_to_rgb_or_float``: 16-bit scaled by 65535,
    transparency composited on black). With ``size``, the image is resized to
    ``size x size`` with PIL bicubic (aspect ratio not kept). This only approximates what
    the Hugging Face Qwen2-VL processor would do with the original (its smart_resize keeps
    the aspect ratio and rounds differently), so models should see images stored and
    attacked at this size. Without ``size``, H and W must already be multiples of ``grid``
    (Qwen2-VL's 28-pixel grid) or a DataError says so; ``size`` itself must be a multiple of
    ``grid`` too. ``grid=None`` turns the grid check off. Images larger than PIL's
    ``Image.MAX_IMAGE_PIXELS`` (decompression bombs) raise DataError.
    """
    return pil_to_tensor(resized_pil(path, size, grid=grid))


def check_size(size, grid: int | None = 28) -> None:
    """DataError unless ``size`` is None or a positive int on the ``grid`` (see :func:`load_image`)."""
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise DataError(f"size must be a positive int, got {size!r}")
    if grid and size is not None and size % grid:
        up = math.ceil(size / grid) * grid
        raise DataError(f"size {size} is not a multiple of {grid} (the model's pixel grid); "
                        f"use e.g. {up}, or grid=None")


def resized_pil(path: str | Path, size: int | None = None, *, grid: int | None = 28) -> Image.Image:
    """The PIL image :func:`load_image` turns into its tensor: ``RGB`` (8-bit) or ``F`` (grey,
    clipped to [0, 1]), resized to ``size x size`` when ``size`` is given. Saving it losslessly
    and loading that file with ``load_image(file, None, grid=None)`` gives the same tensor."""
    path = Path(path)
    check_size(size, grid)
    im = _to_rgb_or_float(_open_image(path), path)
    if size is not None:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    elif grid and (im.width % grid or im.height % grid):
        raise DataError(f"image {path} is {im.width}x{im.height}, not on the {grid}-pixel grid; "
                        f"pass size= (e.g. size={max(grid, round(max(im.size) / grid) * grid)}) "
                        f"to resize it")
    if im.mode == "F":  # bicubic overshoots [0, 1]: clip here, so the saved image is what load_image returns
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0), mode="F")
    return im


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """An ``RGB`` or ``F`` image from :func:`resized_pil` as a float (3, H, W) tensor in [0, 1]."""
    if im.mode == "F":
        x = torch.from_numpy(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0).copy())
        return x.unsqueeze(0).expand(3, -1, -1).contiguous()
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float().div_(255.0)


def load_images(items: Sequence[VQAItem | str | Path], size: int | None, *,
                grid: int | None = 28, cached: bool = False, cache_dir: str | Path | None = None
                ) -> torch.Tensor:
    """A batch (B, 3, size, size) from VQAItems or paths (see :func:`load_image`).

    With ``size=None`` all images must already share one on-grid shape. With ``cached`` (and a
    ``size``) each original is resized once into the on-disk cache (:mod:`safemed_lib.data.cache`,
    under ``cache_dir``) and later calls read the resized file: the same tensor, bit for bit.
    """
    paths = [it.image_path if isinstance(it, VQAItem) else Path(it) for it in items]
    if not paths:
        raise DataError("load_images: no items")
    if cached and size is not None:
        from .cache import cached_image_path

        xs = [load_image(cached_image_path(p, size, cache_dir, grid=grid), None, grid=None) for p in paths]
    else:
        xs = [load_image(p, size, grid=grid) for p in paths]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"load_images: images have different shapes {sorted(shapes)}; pass size=")
    return torch.stack(xs)


def to_pil(x: torch.Tensor) -> Image.Image:
    """A (3,H,W) float image in [0,1] as an RGB PIL image, rounded to the 8-bit grid."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3,H,W) image, got shape {tuple(x.shape)}")
    arr = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def from_pil(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3,H,W) float tensor in [0,1] (exact for 8-bit images)."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
