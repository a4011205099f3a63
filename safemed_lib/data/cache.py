"""An on-disk cache of resized images: each original is decoded and resized once per size.

``cached_image_path(path, size)`` returns a file holding exactly the pixels that
``load_image(path, size)`` gives (``load_image(entry, None, grid=None)`` is bit-identical to it):
8-bit images as lossless PNG, high-bit-depth (float ``F``) ones as 32-bit float TIFF. The first
call writes the entry, later calls only look it up.

**Key.** An entry is named by a SHA-256 of the original's absolute path, its byte size and its
modification time in nanoseconds, plus the Pillow version and this cache's format version (the
resize is Pillow's bicubic, so a Pillow upgrade must not reuse old pixels). Editing, replacing or
touching the original therefore gives a new key, and the stale entry is never read again (it stays
on disk until the cache folder is removed). Hashing the file's content would also catch a rewrite
that keeps the size and the nanosecond mtime, but would read every original at every start-up; a
stat per image is the trade-off chosen here.

**Where.** ``<cache_dir>/resized-<size>/<key[:2]>/<stem>-<key>.png`` (or ``.tiff``). ``cache_dir``
defaults to ``$SAFEMED_IMAGE_CACHE``, else ``data/cache/images`` under the project root (relative
paths are taken from the project root, see :func:`safemed_lib.paths.resolve`). Removing the folder
is always safe.

**Concurrency.** Entries are written to a temporary file in the same folder and moved into place
with ``os.replace``, so processes (ranks) that build the same entry at once never see a partial
file: the last writer wins, with identical content.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import PIL
from PIL import Image

from .. import paths
from .images import check_size, resized_pil
from .items import DataError

CACHE_ENV = "SAFEMED_IMAGE_CACHE"
FORMAT_VERSION = 1
SUFFIXES = {"RGB": ".png", "F": ".tiff"}


def default_cache_dir() -> Path:
    """``$SAFEMED_IMAGE_CACHE`` if set, else ``data/cache/images`` (both from the project root)."""
    env = os.environ.get(CACHE_ENV)
    return paths.resolve(env) if env else paths.DATA / "cache" / "images"


def cache_key(path: str | Path, size: int) -> str:
    """The entry's key for ``path`` at ``size``: identity of the original (absolute path, byte
    size, nanosecond mtime), ``size``, the Pillow version and the cache format version."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    ident = f"v{FORMAT_VERSION}|pil={PIL.__version__}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _entry_stem(path: Path, size: int, cache_dir: Path) -> Path:
    key = cache_key(path, size)
    return cache_dir / f"resized-{size}" / key[:2] / f"{path.stem[:40]}-{key}"


def lookup(path: str | Path, size: int, cache_dir: str | Path | None = None) -> Path | None:
    """The cached entry of ``path`` at ``size`` if it exists (and is current), else None."""
    stem = _entry_stem(Path(path), size, Path(cache_dir) if cache_dir else default_cache_dir())
    for suffix in SUFFIXES.values():
        entry = stem.with_name(stem.name + suffix)
        if entry.is_file():
            return entry
    return None


def cached_image_path(path: str | Path, size: int, cache_dir: str | Path | None = None, *,
                      grid: int | None = 28) -> Path:
    """A file with ``load_image(path, size)``'s pixels, written on the first call (see the module doc).

    ``size`` must be on the ``grid``, as in ``load_image``. Errors of the original (missing,
    unreadable, too large) are :class:`DataError`\\ s naming it.
    """
    if size is None:
        raise DataError("cached_image_path needs a size (the cache holds resized images)")
    check_size(size, grid)
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    hit = lookup(path, size, cache_dir)
    if hit is not None:
        return hit
    im = resized_pil(path, size, grid=None)
    stem = _entry_stem(path, size, cache_dir)
    return _write_atomic(im, stem.with_name(stem.name + SUFFIXES[im.mode]))


def _write_atomic(im: Image.Image, entry: Path) -> Path:
    """Save ``im`` to ``entry`` through a temporary file and ``os.replace``."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"image cache: cannot write in {entry.parent} ({e}); set ${CACHE_ENV} or "
                        "cache_dir= to a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if entry.suffix == ".png":  # zlib level 1: lossless like any level, 4x faster to write than 6
                im.save(f, format="PNG", compress_level=1)
            else:
                im.save(f, format="TIFF")
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return entry


def open_cached(entry: str | Path) -> Image.Image:
    """A cache entry as the RGB PIL image GRPO's trainer gets: what
    ``to_pil(load_image(original, size))`` gives (float entries are rounded to 8 bits and
    repeated over the three channels by ``to_pil``)."""
    from .images import _open_image, pil_to_tensor, to_pil

    im = _open_image(Path(entry))
    if im.mode == "RGB":
        return im
    if im.mode != "F":
        raise DataError(f"image cache entry {entry} has mode {im.mode}, not RGB or F; remove it")
    return to_pil(pil_to_tensor(im))
