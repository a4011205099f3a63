"""SFT step time of the tiny model, and whether the profile's SFT runs fit the issue's 10 minutes.

Trains both variants as the ``tiny`` profile does (configs/tiny.yaml: batch size, lr, fixed vision
tower, the answer-only run's binding terms) for ``--steps`` steps from a random tiny model on a small
generated benchmark (the step time does not depend on the weights), on 1 and 2 torch threads. The
answer-only run is also timed with the vision tower run on every step (``--no-cache``: the image
embeddings cache of ``sft.train_sft`` swapped out, benchmark only). Step time: the seconds column of
``train_log.csv`` over the second half of the steps (the first epoch fills the cache). Projected:
step time x the profile's steps.

Writes benchmarks/out/bench_sft.json and .md.

    .venv/bin/python benchmarks/bench_sft.py --steps 200
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_pgd import load_note, write  # noqa: E402

LIMIT_S = 600  # the budget for each SFT variant, on 2 cores


def step_time(out_dir: Path) -> float:
    from safemed_lib import sft

    log = sft.read_log(out_dir)
    half = log[log.step >= log.step.max() / 2]
    first, last = half.iloc[0], half.iloc[-1]
    return float((last.seconds - first.seconds) / (last.step - first.step))


def time_run(vlm_dir: Path, train, cfg: dict, variant: str, threads: int, steps: int, cache: bool, out: Path) -> dict:
    import safemed_lib
    from safemed_lib import data, models, sft

    safemed_lib.set_threads(threads)
    vlm = models.load_vlm(vlm_dir, image_size=cfg["image_size"])
    # the variant's settings as every notebook gets them from the profile
    kw = sft.variant_kwargs(variant, steps=cfg["sft_steps"], nothink_steps=cfg["sft_nothink_steps"],
                            nothink_binding_aux=cfg["sft_nothink_binding"],
                            nothink_weight_decay=cfg["sft_nothink_weight_decay"])
    kw.pop("train_threads", None)  # set above
    profile_steps = kw.pop("steps")
    original = sft.cached_image_embeds
    if not cache:
        sft.cached_image_embeds = lambda vlm, items, size, cache: data.load_images(items, size=size)
    try:
        sft.train_sft(vlm, train, variant=variant, steps=steps, lr=cfg["sft_lr"], batch_size=cfg["sft_batch_size"],
                      image_size=cfg["image_size"], out_dir=out, train_vision=cfg["sft_train_vision"],
                      seed=0, log_every=10, save_every=10 ** 9, **kw)
    finally:
        sft.cached_image_embeds = original
    s = step_time(out)
    return {"variant": variant, "threads": threads, "image_cache": cache, "step_s": s,
            "profile_steps": profile_steps, "projected_s": s * profile_steps, "load": load_note(threads)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-images", type=int, default=160)
    ap.add_argument("--no-cache", action="store_true", help="also time answer-only SFT without the image cache")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())

    import torch

    from safemed_lib import models, sft, workbook

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = workbook.dataset(None, tmp / "bench", args.n_images, cfg["image_size"], 0)
        vlm = models.build_tiny_vlm(sft.corpus_texts(train + test), seed=0, image_size=cfg["image_size"],
                                    **sft.TINY_MODEL)
        vlm_dir = vlm.save(tmp / "base")
        plan = [("nothink", 2, True), ("nothink", 1, True), ("think", 2, True), ("think", 1, True)]
        if args.no_cache:
            plan.insert(1, ("nothink", 2, False))
        for i, (variant, threads, cache) in enumerate(plan):
            rows.append(time_run(vlm_dir, train, cfg, variant, threads, args.steps, cache, tmp / f"run{i}"))
            print(rows[-1], flush=True)
    meta = {"benchmark": "bench_sft", "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "steps": args.steps, "n_images": args.n_images, "limit_s": LIMIT_S,
            "config": Path(args.config).name}
    lines = [f"# SFT step time (tiny model, CPU, {args.steps} steps, second half timed)", "",
             f"Profile {meta['config']}: batch {cfg['sft_batch_size']}, vision tower "
             f"{'trained' if cfg['sft_train_vision'] else 'fixed'}, answer-only binding terms "
             f"{cfg['sft_nothink_binding']}.", "",
             "| variant | threads | image cache | step (s) | profile steps | projected (s) | within 600 s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['threads']} | {'yes' if r['image_cache'] else 'no'} | {r['step_s']:.4f} | "
                     f"{r['profile_steps']} | {r['projected_s']:.0f} | {'yes' if r['projected_s'] <= LIMIT_S else 'no'} "
                     f"| {r['load']} |")
    lines += ["", "Projected: training steps only (not the first epoch's image embedding, loading or evaluation)."]
    write("bench_sft", meta, rows, lines)
    return rows


if __name__ == "__main__":
    main()
