"""GRPO's data path: start-up time and resident memory of ``grpo.build_dataset``, before and after the image cache.

Generates ``--n`` synthetic originals (``--orig`` px square RGB PNGs: a smooth random background,
a few shapes and pixel noise, like a scan's texture), one question each, in a temporary folder,
and builds GRPO's dataset at ``--image-size`` three ways, each in a fresh subprocess so that its
memory is its own:

- ``eager (before)``: the builder before the cache, kept here verbatim: every original decoded and
  resized at start-up, PIL images handed to ``Dataset.from_dict`` (which re-encodes them as PNG);
- ``cached, cold``: ``grpo.build_dataset`` with an empty cache (each original resized once and
  written to the cache);
- ``cached, warm``: the same again (a stat and a look-up per image, no decode).

Per row: start-up seconds, the resident memory the dataset keeps (VmRSS after the build minus
before), the peak during the build on top of the pre-build RSS (VmHWM, reset before the build
through /proc/self/clear_refs; ru_maxrss, which includes the imports, where that fails), and milliseconds to read one
row's image (mean over 64 rows). The pixels of the three datasets are compared on those rows. Writes
benchmarks/out/bench_data.json and .md, with the load average the timings were taken at.

    .venv/bin/python benchmarks/bench_data.py [--n 10000] [--orig 512] [--image-size 392]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pgd import load_note, write  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
import numpy as np
from datasets import Dataset
from PIL import Image
from safemed_lib import data, grpo, prompts

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

def eager_build_dataset(items, mode, image_size):  # grpo.build_dataset before the cache (its data part)
    cache, images = {}, []
    for it in items:
        key = str(it.image_path)
        if key not in cache:
            cache[key] = data.to_pil(data.load_image(it.image_path, image_size))
        images.append(cache[key])
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts.build_prompt(it, mode)}] for it in items],
        "image": images, "answer": [it.answer for it in items], "n_options": [len(it.options) for it in items],
        "question_id": [it.question_id for it in items], "modality": [it.modality for it in items],
        "question_type": [it.question_type for it in items]})

variant, image_dir, n, size, cache_dir = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
items = [data.VQAItem(question_id=f"q{i}", dataset="bench", image_path=image_dir / f"{i:05d}.png",
                      question="Which modality is this?", options=["CT", "MRI", "X-Ray", "OCT"], answer="ABCD"[i % 4],
                      modality="CT", question_type="Modality Recognition") for i in range(n)]
rss0 = status_mb("VmRSS")
peak_reset = reset_peak()
t0 = time.perf_counter()
ds = (eager_build_dataset(items, "think", size) if variant == "eager"
      else grpo.build_dataset(items, "think", size, cache_dir=cache_dir))
startup = time.perf_counter() - t0
rss1, peak = status_mb("VmRSS"), status_mb("VmHWM")
rows = [int(i) for i in np.linspace(0, n - 1, 64)]
t0 = time.perf_counter()
ims = [ds[i]["image"] for i in rows]
read_ms = (time.perf_counter() - t0) / len(rows) * 1000
digest = hashlib.sha256(b"".join(np.asarray(im.convert("RGB")).tobytes() for im in ims)).hexdigest()[:16]
print(json.dumps(dict(startup_s=startup, rss_kept_mb=rss1 - rss0,
                      peak_over_start_mb=(peak if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - rss0,
                      peak_reset=peak_reset,
                      row_read_ms=read_ms, pixels_sha256=digest)))
"""

VARIANTS = [("eager (before)", "eager"), ("cached, cold", "cached"), ("cached, warm", "cached")]


def make_originals(folder: Path, n: int, side: int, seed: int = 0) -> float:
    """``n`` RGB PNGs of ``side`` px: a smooth random background, four ellipses, +-8 noise. Returns seconds."""
    import numpy as np
    from PIL import Image, ImageDraw

    t0 = time.perf_counter()
    base = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng(seed + 1 + i)
        im = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((side, side), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = rng.integers(0, side - 64, 2)
            w, h = rng.integers(16, 64, 2)
            draw.ellipse([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        a = np.asarray(im, dtype=np.int16) + rng.integers(-8, 9, (side, side, 1), dtype=np.int16)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png", compress_level=1)
    return time.perf_counter() - t0


def run(variant: str, image_dir: Path, n: int, size: int, cache_dir: Path) -> dict:
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(image_dir), str(n), str(size), str(cache_dir)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:  # a failure is a result too: the variant's row says why, when and at what memory
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        print(f"{variant}: exit {out.returncode}: {out.stderr[-3000:]}", file=sys.stderr, flush=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
        return {"error": f"exit {out.returncode} after {time.perf_counter() - t0:.0f} s (whole process, "
                         f"imports included; peak RSS of the largest child so far {peak:.0f} MB): {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(r: dict, before: dict | None) -> str:
    """One table row: the numbers, or why the variant failed."""
    if "error" in r:
        return f"| {r['variant']} | failed: {r['error']} | | | | | {r['load']} |"
    ratio = f"{before['startup_s'] / r['startup_s']:.1f}x" if before else "-"
    return (f"| {r['variant']} | {r['startup_s']:.1f} | {ratio} | {r['rss_kept_mb']:.0f} | "
            f"{r['peak_over_start_mb']:.0f} | {r['row_read_ms']:.2f} | {r['load']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="images (one question each)")
    ap.add_argument("--orig", type=int, default=512, help="side of the synthetic originals, px")
    ap.add_argument("--image-size", type=int, default=392, help="the training size (the paper profile's)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        (tmp / "orig").mkdir()
        gen_s = make_originals(tmp / "orig", args.n, args.orig)
        print(f"generated {args.n} originals of {args.orig} px in {gen_s:.0f} s", flush=True)
        rows = []
        for label, variant in VARIANTS:
            r = {"variant": label, **run(variant, tmp / "orig", args.n, args.image_size, tmp / "cache"),
                 "load": load_note(1)}
            rows.append(r)
            print(f"{label:15s} " + (r["error"] if "error" in r else
                  f"start-up {r['startup_s']:7.1f} s, kept {r['rss_kept_mb']:7.0f} MB, "
                  f"peak +{r['peak_over_start_mb']:7.0f} MB, row {r['row_read_ms']:.2f} ms"), flush=True)
        cache_mb = sum(p.stat().st_size for p in (tmp / "cache").rglob("*") if p.is_file()) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [r for r in rows if "error" not in r]
    same = len({r["pixels_sha256"] for r in ok}) == 1
    meta = dict(n=args.n, orig_px=args.orig, image_size=args.image_size, generate_s=gen_s, cache_mb=cache_mb,
                same_pixels=same, machine=platform.processor() or platform.machine(), python=platform.python_version(),
                cpus=os.cpu_count(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    before = rows[0] if "error" not in rows[0] else None
    lines = [f"# GRPO dataset start-up: {args.n} images, {args.orig} px PNG originals -> {args.image_size} px", "",
             "| variant | start-up (s) | vs before | RSS kept (MB) | peak RSS over start (MB) | row read (ms) | load |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row(r, before) for r in rows]
    lines += ["", f"Same pixels in the variants that finished ({len(ok)}; 64 rows compared): {'yes' if same else 'NO'}. "
              f"Cache on disk: {cache_mb:.0f} MB. RSS kept: VmRSS after the build minus before, in a fresh process."]
    write("bench_data", meta, rows, lines)


if __name__ == "__main__":
    main()
