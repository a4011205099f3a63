"""The on-disk cache of resized images (safemed_lib/data/cache.py): bit-identical to load_image,
hit on the second call, keyed by the original's identity (a changed original is re-read), clear
errors naming the file, atomic writes."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safemed_lib import data as D
from safemed_lib.data import DataError, cache, images, load_image


def _originals(tmp: Path) -> list[Path]:
    """Originals in the modes load_image handles, larger than the target sizes and off-grid."""
    rng = np.random.default_rng(0)
    g = np.linspace(0, 1, 301 * 203).reshape(203, 301)
    ims = {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)),
        "l.png": Image.fromarray((g * 255).astype(np.uint8)),
        "i16.png": Image.fromarray((g * 65535).astype(np.uint16)),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (120, 90, 4), dtype=np.uint8), "RGBA"),
        "cmyk.jpg": Image.new("CMYK", (97, 61), (0, 255, 255, 0)),
        # a hard 0/1 edge: bicubic overshoots [0, 1], which load_image clips
        "f.tiff": Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.float32), "F"),
    }
    out = []
    for name, im in ims.items():
        im.save(tmp / name)
        out.append(tmp / name)
    return out


@pytest.mark.parametrize("size", [28, 56, 112])
def test_entry_is_bit_identical_to_load_image(tmp_path, size):
    for orig in _originals(tmp_path):
        entry = D.cached_image_path(orig, size, tmp_path / "cache")
        assert entry.suffix == (".tiff" if orig.name in ("f.tiff", "i16.png") else ".png")  # float: TIFF
        assert entry.parent.parent.name == f"resized-{size}"
        ref = load_image(orig, size)
        assert torch.equal(load_image(entry, None, grid=None), ref), orig.name
        # what GRPO's trainer gets: the old eager to_pil(load_image(...)), pixel for pixel
        assert np.array_equal(np.asarray(D.open_cached(entry)), np.asarray(D.to_pil(ref))), orig.name


def _count_decodes(monkeypatch) -> list[Path]:
    seen: list[Path] = []
    real = images._open_image

    def counting(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(images, "_open_image", counting)
    return seen


def test_second_call_is_a_hit(tmp_path, monkeypatch):
    orig = _originals(tmp_path)[0]
    seen = _count_decodes(monkeypatch)
    first = D.cached_image_path(orig, 56, tmp_path / "cache")
    assert seen == [orig]
    assert D.cached_image_path(orig, 56, tmp_path / "cache") == first and seen == [orig]
    assert cache.lookup(orig, 56, tmp_path / "cache") == first
    assert cache.lookup(orig, 28, tmp_path / "cache") is None  # keyed by size
    assert D.cached_image_path(orig, 28, tmp_path / "cache") != first


def test_changed_original_is_not_served_stale(tmp_path):
    orig = tmp_path / "x.png"
    Image.new("RGB", (300, 300), (255, 0, 0)).save(orig)
    old = D.cached_image_path(orig, 28, tmp_path / "cache")
    st = orig.stat()
    Image.new("RGB", (300, 300), (0, 0, 255)).save(orig)  # same byte size likely: rely on mtime too
    os.utime(orig, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = D.cached_image_path(orig, 28, tmp_path / "cache")
    assert new != old and old.is_file()  # the stale entry stays on disk but is never read again
    assert torch.equal(load_image(new, None, grid=None), load_image(orig, 28))
    assert load_image(new, None, grid=None)[2].min() == 1.0


def test_errors_name_the_file(tmp_path):
    junk = tmp_path / "scan_0042.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"scan_0042\.png cannot be read by PIL"):
        D.cached_image_path(junk, 56, tmp_path / "cache")
    with pytest.raises(DataError, match=r"missing\.png not found"):
        D.cached_image_path(tmp_path / "missing.png", 56, tmp_path / "cache")
    good = _originals(tmp_path)[0]
    with pytest.raises(DataError, match="384 is not a multiple of 28"):
        D.cached_image_path(good, 384, tmp_path / "cache")
    with pytest.raises(DataError, match="needs a size"):
        D.cached_image_path(good, None, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.*"))  # nothing half-written


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    orig = _originals(tmp_path)[0]

    def broken(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        D.cached_image_path(orig, 56, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_concurrent_writers_agree(tmp_path):
    orig = _originals(tmp_path)[0]
    got, errors = [], []

    def work():
        try:
            got.append(D.cached_image_path(orig, 56, tmp_path / "cache"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files == [got[0]]  # no temporary files left
    assert torch.equal(load_image(got[0], None, grid=None), load_image(orig, 56))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    assert D.default_cache_dir() == tmp_path / "c"
    orig = _originals(tmp_path)[0]
    assert D.cached_image_path(orig, 28).is_relative_to(tmp_path / "c")
    monkeypatch.delenv(cache.CACHE_ENV)
    assert D.default_cache_dir().parts[-3:] == ("data", "cache", "images")


def test_load_images_cached_is_bit_identical_and_decodes_once(tmp_path, monkeypatch):
    origs = _originals(tmp_path)
    ref = D.load_images(origs, 56)
    seen = _count_decodes(monkeypatch)
    for _ in range(2):
        assert torch.equal(D.load_images(origs, 56, cached=True, cache_dir=tmp_path / "cache"), ref)
    assert sorted(p for p in seen if p in origs) == sorted(origs)  # each original decoded once in two calls
