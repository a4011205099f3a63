"""PGD's cost: time per image against its floor, and against a textbook PGD on a small CNN.

1. Tiny VLM (the embedded default's architecture, untrained: timing does not depend on the
   weights): ``attacks.pgd`` with ``steps`` steps on ``attacks.vlm_answer_loss`` vs its floor,
   ``steps x`` one forward+backward (loss -> gradient w.r.t. the image) of the same batch.
   Goal: <= 1.15x. Measured for the no-think target (the answer block) and the think target
   (a rationale then the answer, as SFT-think writes it).
2. Small CNN classifier on 32x32 images: ``attacks.pgd`` vs a torchattacks-style textbook L-inf PGD
   loop written out below, per forward+backward. Goal: no slower (ratio <= 1.0 within noise).

Timings are medians over interleaved repeats, one torch thread. Writes
``benchmarks/out/bench_pgd.json`` and ``benchmarks/out/bench_pgd.md`` (one Markdown row per
measurement). Run: ``.venv/bin/python benchmarks/bench_pgd.py [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from safemed_lib import attacks, base, data, dataset, models, synth  # noqa: E402
from safemed_lib.config import TinyBase  # noqa: E402
from safemed_lib.targets import scenes_for  # noqa: E402
from safemed_lib.paths import PROJECT_ROOT  # noqa: E402
from safemed_lib.records import atomic_write_text  # noqa: E402

OUT = PROJECT_ROOT / "benchmarks" / "out"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, repeats interleaved so load changes hit all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def load_note(threads: int = 1) -> str:
    """The 1-minute load average and whether it means contended timings. A benchmark on ``threads``
    torch threads alone puts the load near ``threads``; above ``threads + 0.5``, another job shared
    the cores."""
    load, cpus = os.getloadavg()[0], os.cpu_count()
    state = "contended: another job shared the cores" if load > threads + 0.5 else "a quiet machine"
    return f"load average {load:.2f} on {cpus} cores ({state})"


def write(name: str, meta: dict, rows: list[dict], lines: list[str]) -> None:
    """``benchmarks/out/<name>.json`` (meta + rows) and ``<name>.md`` (the lines); print the lines."""
    atomic_write_text(OUT / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(OUT / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def bench_split(image_size: int, bench_dir: str = "data/bench/bench_pgd", n_images: int = 40, seed: int = 0):
    """(train, test) of a small embedded benchmark (generated once), split per image."""
    items = dataset.load_items(None, bench_dir, n_images=n_images, image_size=image_size, seed=seed)
    return data.split_by_image(items, test_frac=0.2, seed=seed)


def tiny_vlm(items, image_size: int, tiny: TinyBase | None = None):
    """The tiny architecture of ``tiny`` (``config.TinyBase``; default: the embedded default's),
    untrained, its tokenizer learnt on ``items``' texts (``base.corpus_texts``)."""
    tiny = tiny or TinyBase()
    return models.build_tiny_vlm(base.corpus_texts(items), seed=0, image_size=image_size,
                                 hidden_size=tiny.hidden_size, layers=tiny.layers)


def fwd_bwd(loss_fn, x):
    def run():
        xr = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(loss_fn(xr).sum(), xr)
    return run


def bench_vlm(args) -> list[dict]:
    train, test = bench_split(args.image_size)
    items = (train + test)[: args.batch]
    vlm = tiny_vlm(train + test, args.image_size)
    vlm.model.eval()
    x = data.load_images(items, size=args.image_size)
    scenes = scenes_for(items)
    target_sets = {
        "nothink (answer target)": ("nothink", [attacks.prompts.format_completion(it.answer, "nothink") for it in items]),
        "think (rationale + answer target)": ("think", [attacks.prompts.format_completion(
            it.answer, "think", synth.rationale(it, sc)) for it, sc in zip(items, scenes)]),
    }
    rows = []
    for name, (prompt, targets) in target_sets.items():
        loss_fn = attacks.vlm_answer_loss(vlm, items, prompt=prompt, targets=targets)
        g = torch.Generator().manual_seed(0)
        t = medians({
            "fb": fwd_bwd(loss_fn, x),
            "pgd": lambda: attacks.pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=args.steps, generator=g),
        }, args.repeats)
        floor = args.steps * t["fb"]
        rows.append({"case": f"tiny VLM, {name}", "batch": len(items), "image": args.image_size,
                     "steps": args.steps, "fwd_bwd_ms": 1e3 * t["fb"], "floor_ms": 1e3 * floor,
                     "pgd_ms": 1e3 * t["pgd"], "pgd_ms_per_image": 1e3 * t["pgd"] / len(items),
                     "ratio": t["pgd"] / floor, "goal": "<= 1.15 x floor", "ok": t["pgd"] / floor <= 1.15})
    return rows


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)


def reference_pgd(model, images, labels, eps, alpha, steps):
    """Textbook L-inf PGD with a random start, as torchattacks' PGD writes it."""
    loss = nn.CrossEntropyLoss()
    adv = images.clone().detach()
    adv = adv + torch.empty_like(adv).uniform_(-eps, eps)
    adv = torch.clamp(adv, min=0, max=1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = loss(model(adv), labels)
        grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def bench_cnn(args) -> list[dict]:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(args.cnn_batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.cnn_batch,))
    loss_fn = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    t = medians({
        "fb": fwd_bwd(loss_fn, x),
        "ref": lambda: reference_pgd(model, x, y, 8 / 255, 2 / 255, args.steps),
        "ours": lambda: attacks.pgd(loss_fn, x, eps=8 / 255, alpha=2 / 255, steps=args.steps),
    }, args.repeats)
    n = args.steps
    return [{"case": "small CNN, 32x32: ours vs textbook PGD", "batch": args.cnn_batch, "image": 32,
             "steps": n, "fwd_bwd_ms": 1e3 * t["fb"], "floor_ms": 1e3 * n * t["fb"], "ref_ms": 1e3 * t["ref"],
             "pgd_ms": 1e3 * t["ours"], "pgd_ms_per_image": 1e3 * t["ours"] / args.cnn_batch,
             "ratio": t["ours"] / t["ref"], "ratio_floor": t["ours"] / (n * t["fb"]),
             "goal": "<= 1.0 x reference (+5% timing noise)", "ok": t["ours"] / t["ref"] <= 1.05}]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cnn-batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller image (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.image_size = 2, 56
    torch.set_num_threads(1)
    rows = bench_vlm(args) + bench_cnn(args)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "loadavg_1m": os.getloadavg()[0],
            "repeats": args.repeats, "note": f"medians of interleaved repeats; {load_note()}"}
    lines = ["| case | batch | steps | fwd+bwd ms | floor ms | PGD ms | PGD ms/image | ratio | goal | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} | {r['steps']} | {r['fwd_bwd_ms']:.1f} | {r['floor_ms']:.1f} | "
                     f"{r['pgd_ms']:.1f} | {r['pgd_ms_per_image']:.2f} | {r['ratio']:.3f} | {r['goal']} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines.append(f"\n{meta['note']}; {meta['threads']} torch thread, torch {meta['torch']}.")
    write("bench_pgd", meta, rows, lines)


if __name__ == "__main__":
    main()
