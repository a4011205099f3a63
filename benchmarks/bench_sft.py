"""SFT step time of the tiny model, and whether the profile's SFT runs fit the issue's 10 minutes.

Trains both variants as the profile does (``--profile``, default tiny: the recipes ``sft.think`` and
``sft.nothink``: batch size, lr, weight decay, fixed vision tower, the answer-only run's binding terms;
``--set`` overrides keys) for ``--steps`` steps from a random tiny model (``model.tiny``) on a small
generated benchmark (the step time does not depend on the weights), on 1 and 2 torch threads. The
answer-only run is also timed with the vision tower run on every step (``--no-cache``: the image
embeddings cache of ``sft.train_sft`` swapped out, benchmark only). Step time: the seconds column of
``train_log.csv`` over the second half of the steps (the first epoch fills the cache). Projected:
step time x the profile's steps.

Writes benchmarks/out/bench_sft.json and .md.

    .venv/bin/python benchmarks/bench_sft.py --steps 200 [--profile tiny] [--set sft.nothink.lr=0.002]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

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


def time_run(vlm_dir: Path, train, cfg, variant: str, threads: int, steps: int, cache: bool, out: Path) -> dict:
    import safemed_lib
    from safemed_lib import data, models, sft

    safemed_lib.set_threads(threads)  # the recipe's own threads setting is what is being compared
    size = cfg.data.image_size
    vlm = models.load_vlm(vlm_dir, image_size=size)
    recipe = getattr(cfg.sft, variant)  # the variant's recipe as the zoo trains it from the profile
    profile_steps = recipe.steps
    original = sft.cached_image_embeds
    if not cache:
        sft.cached_image_embeds = lambda vlm, items, size, cache: data.load_images(items, size=size)
    try:
        sft.train_sft(vlm, train, recipe.model_copy(update={"steps": steps}), variant=variant, image_size=size,
                      out_dir=out, seed=0, log_every=10, save_every=10 ** 9)
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
    ap.add_argument("--profile", default="tiny", help="configs/<name>.yaml or a YAML path (default: tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one configuration key (repeatable)")
    args = ap.parse_args(argv)

    import torch

    from bench_pgd import bench_split, tiny_vlm
    from safemed_lib import config

    cfg = config.load(args.profile, args.overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = bench_split(cfg.data.image_size, tmp / "bench", n_images=args.n_images)
        vlm = tiny_vlm(train + test, cfg.data.image_size, cfg.model.tiny)
        vlm_dir = vlm.save(tmp / "base")
        plan = [("nothink", 2, True), ("nothink", 1, True), ("think", 2, True), ("think", 1, True)]
        if args.no_cache:
            plan.insert(1, ("nothink", 2, False))
        for i, (variant, threads, cache) in enumerate(plan):
            rows.append(time_run(vlm_dir, train, cfg, variant, threads, args.steps, cache, tmp / f"run{i}"))
            print(rows[-1], flush=True)
    meta = {"benchmark": "bench_sft", "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "steps": args.steps, "n_images": args.n_images, "limit_s": LIMIT_S,
            "profile": cfg.profile, "overrides": args.overrides,
            "recipes": {v: getattr(cfg.sft, v).model_dump() for v in ("think", "nothink")}}

    def recipe(variant):
        r = getattr(cfg.sft, variant)
        binding = "none" if r.binding is None else ", ".join(f"{k} {v:g}" for k, v in r.binding.model_dump().items()
                                                              if k in ("match", "letter", "attention", "content",
                                                                       "scene") and v)
        return (f"{variant}: batch {r.batch_size}, lr {r.lr:g}, weight decay {r.weight_decay:g}, vision tower "
                f"{'trained' if r.train_vision else 'fixed'}, binding terms {binding}")

    lines = [f"# SFT step time (tiny model, CPU, {args.steps} steps, second half timed)", "",
             f"Profile {cfg.profile}{' with ' + ', '.join(args.overrides) if args.overrides else ''}: "
             f"{recipe('think')}; {recipe('nothink')}.", "",
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
