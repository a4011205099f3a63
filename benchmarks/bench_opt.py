"""Before/after ratios of the speed-ups in the VLM wrapper (issue: "make the slow parts fast").

Each row times the same call two ways in one run (medians of interleaved repeats, one torch
thread, the tiny model untrained: timing does not depend on the weights):

1. ``preprocess`` on a same-size batch: one batched reshape (now) vs the per-image loop (before).
2. ``VLM._encode`` (preprocess + prompt token ids + padding): memoized prompt ids and batched
   preprocessing (now) vs rendering the chat template and tokenizing every call, per-image
   preprocessing (before).
3. The certifier's fast path (``option_logprobs`` under no_grad, one batch of noisy copies of
   one item, as ``smoothing`` samples it) and PGD (10 steps on the no-think answer loss), now vs
   before: the end-to-end effect of 1 and 2.
4. Attention kernel: SDPA (the default) vs eager, on the fast path.
5. ``--compile``: ``torch.compile`` of the model's forward on the fast path, with the one-off
   compile time (off by default: it takes minutes on CPU).

Writes ``benchmarks/out/bench_opt.json`` and ``.md``. Run: ``.venv/bin/python benchmarks/bench_opt.py``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from safemed_lib import attacks, data, models, prompts  # noqa: E402

from bench_pgd import bench_split, load_note, medians, tiny_vlm, write  # noqa: E402


def before(vlm):
    """Switch ``vlm`` to the pre-optimization path: no prompt memo, per-image preprocessing."""
    vlm.cache_prompts = False
    vlm.preprocess = lambda images: models.VLM.preprocess(vlm, list(images))


def after(vlm):
    vlm.cache_prompts = True
    vlm.__dict__.pop("preprocess", None)


def toggled(vlm, fn):
    """Callables running ``fn`` on the before and the after path."""
    def run(setup):
        def go():
            setup(vlm)
            try:
                return fn()
            finally:
                after(vlm)
        return go
    return {"before": run(before), "after": run(after)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="noise samples per fast-path batch")
    p.add_argument("--pgd-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on CPU)")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = bench_split(112)
    items = train + test
    vlm = tiny_vlm(items, 112)
    vlm.model.eval()
    one = [items[0]] * args.batch  # the certifier scores noisy copies of one item
    x1 = data.load_images(items[:1], size=112).expand(args.batch, -1, -1, -1)
    noisy = (x1 + 0.25 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))).contiguous()
    pgd_items = items[: args.pgd_batch]
    xp = data.load_images(pgd_items, size=112)
    loss_fn = attacks.vlm_answer_loss(vlm, pgd_items, prompt="nothink",
                                      targets=[prompts.format_completion(it.answer, "nothink") for it in pgd_items])
    g = torch.Generator()

    def fast_path():
        with torch.no_grad():
            vlm.option_logprobs(noisy, one)

    def pgd():
        attacks.pgd(loss_fn, xp, eps=8 / 255, alpha=2 / 255, steps=10, generator=g.manual_seed(0))

    cases = [("preprocess, same-size batch", args.batch, lambda: vlm.preprocess(noisy)),
             ("_encode (pixels + prompt ids + padding)", args.batch, lambda: vlm._encode(noisy, one, "nothink")),
             ("certify fast path (option_logprobs, no grad)", args.batch, fast_path),
             ("PGD, 10 steps, nothink answer loss", args.pgd_batch, pgd)]
    rows = []
    for name, n, fn in cases:
        t = medians(toggled(vlm, fn), args.repeats)
        rows.append({"case": name, "batch": n, "before_ms": 1e3 * t["before"], "after_ms": 1e3 * t["after"],
                     "speedup": t["before"] / t["after"]})

    impl = {}
    for kind in ("sdpa", "eager"):
        def run(kind=kind):
            vlm.model.set_attn_implementation(kind)
            try:
                fast_path()
            finally:
                vlm.model.set_attn_implementation("sdpa")
        impl[kind] = run
    t = medians(impl, args.repeats)
    rows.append({"case": "attention: SDPA (after) vs eager (before), fast path", "batch": args.batch,
                 "before_ms": 1e3 * t["eager"], "after_ms": 1e3 * t["sdpa"], "speedup": t["eager"] / t["sdpa"]})

    if args.compile:
        plain = medians({"plain": fast_path}, args.repeats)["plain"]
        forward = vlm.model.forward
        vlm.model.forward = torch.compile(forward, dynamic=True)
        t0 = time.perf_counter()
        fast_path()
        compile_s = time.perf_counter() - t0
        comp = medians({"compiled": fast_path}, args.repeats)["compiled"]
        vlm.model.forward = forward
        rows.append({"case": "torch.compile (after) vs eager PyTorch (before), fast path", "batch": args.batch,
                     "before_ms": 1e3 * plain, "after_ms": 1e3 * comp, "speedup": plain / comp,
                     "compile_s": compile_s, "break_even_calls": compile_s / max(plain - comp, 1e-9)})

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "loadavg_1m": os.getloadavg()[0],
            "repeats": args.repeats}
    lines = ["| change | batch | before ms | after ms | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        extra = (f" (compile {r['compile_s']:.0f} s once; pays off after {r['break_even_calls']:.0f} calls)"
                 if "compile_s" in r else "")
        lines.append(f"| {r['case']} | {r['batch']} | {r['before_ms']:.1f} | {r['after_ms']:.1f} | "
                     f"{r['speedup']:.2f}x{extra} |")
    lines.append(f"\nmedians of {args.repeats} interleaved repeats, tiny model, 112 px, 1 torch thread, torch "
                 f"{meta['torch']}; {load_note()}.")
    write("bench_opt", meta, rows, lines)


if __name__ == "__main__":
    main()
