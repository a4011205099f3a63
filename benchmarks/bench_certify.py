"""Speed of the randomized-smoothing certifier on a VLM (not a test; numbers, not pass/fail).

Measures, for one model and the profile's image size:
* samples/s of both base classifiers (``logprob_classifier``: one teacher-forced forward pass;
  ``generation_classifier``: greedy decoding + answer parsing, with the nothink prompt and
  --max-new-tokens, and with the think prompt and the profile's certify.max_new_tokens) over a
  batch-size sweep;
* the fast path's speed-up (best logprob rate / best generation rate);
* seconds per certified item at the profile's certify.n0 + certify.n (``certify.certify_items``, both paths).

Usage:  .venv/bin/python benchmarks/bench_certify.py [--profile tiny] [--set key=value ...] [--model NAME_OR_DIR]
Without --model it builds the untrained tiny VLM on the benchmark's text; an untrained model
never stops early, so generation always runs to its max new tokens: the worst case (a trained
answer-only model stops after its ~6-token "<answer> X </answer>", a think model after its
rationale). Pass --model (e.g. sft-nothink, or a checkpoint dir) to time a trained model.
Writes benchmarks/out/bench_certify.json and .md, with the load average the timings were taken at.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import safemed_lib  # noqa: E402
from safemed_lib import certify, config, dataset, models, smoothing, zoo  # noqa: E402
from safemed_lib.paths import PROJECT_ROOT  # noqa: E402
from safemed_lib.records import atomic_write_text  # noqa: E402
from bench_pgd import load_note  # noqa: E402

OUT = PROJECT_ROOT / "benchmarks" / "out"


def rate(classify, x, batch_size, repeats, sigma=0.25, seed=0):
    """Median samples/s of ``classify`` on noisy copies of x (first call is a warm-up)."""
    g = torch.Generator().manual_seed(seed)
    batch = x.unsqueeze(0).expand(batch_size, *x.shape)
    classify(batch + sigma * torch.randn(batch.shape, generator=g))
    times = []
    for _ in range(repeats):
        noisy = batch + sigma * torch.randn(batch.shape, generator=g)
        t0 = time.perf_counter()
        classify(noisy)
        times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def _old_logprob_classifier(vlm, item):
    """The fast path before ``OptionScorer``: ``VLM.option_logprobs`` on every noisy copy."""
    def classify(images):
        return torch.stack([s.argmax() for s in vlm.option_logprobs(images, [item] * len(images))])
    return classify


def flops_per_sample(fn, batch: int) -> float:
    """FLOPs of one call of ``fn`` (torch's FlopCounterMode: matrix products and attention) / batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / batch


def matmul_gflops(vlm, batch: int, repeats: int = 20) -> float:
    """GFLOP/s of this core on the language model's own matrix product (batch x tokens rows,
    hidden -> intermediate): the best the model's largest layers can run at here."""
    cfg = vlm.model.config.text_config
    a = torch.randn(batch * 100, cfg.hidden_size)
    w = torch.randn(cfg.intermediate_size, cfg.hidden_size)
    torch.nn.functional.linear(a, w)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        ts.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * w.shape[0] * w.shape[1] / min(ts) / 1e9


def side_by_side(vlm, item, x, batch_sizes, samples: int, repeats: int) -> dict:
    """End-to-end certification samples/s (noise + classifier + counting) of the fast path before and
    after ``OptionScorer``, interleaved per repeat, against the FLOP floor of each computation."""
    from safemed_lib.models import OptionScorer

    k = len(item.options) + 1
    scorer = OptionScorer(vlm, item)
    variants = {
        "before: option_logprobs, pixel noise": lambda bs, g: smoothing.sample_counts(
            _old_logprob_classifier(vlm, item), x, samples, sigma=0.25, batch_size=bs, num_classes=k, generator=g),
        "OptionScorer, pixel noise": lambda bs, g: smoothing.sample_counts(
            lambda im: scorer.logprobs(im).argmax(-1), x, samples, sigma=0.25, batch_size=bs, num_classes=k,
            generator=g),
        "OptionScorer, noise in the patch embedding": lambda bs, g: scorer.counts(
            x, samples, sigma=0.25, batch_size=bs, num_classes=k, generator=g),
    }
    rows = []
    with torch.no_grad():
        for bs in batch_sizes:
            times = {v: [] for v in variants}
            for fn in variants.values():
                fn(bs, torch.Generator().manual_seed(0))           # warm-up
            for r in range(repeats):
                for v, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(bs, torch.Generator().manual_seed(r))
                    times[v].append(time.perf_counter() - t0)
            rows += [{"variant": v, "batch_size": bs, "samples_per_s": samples / statistics.median(t)}
                     for v, t in times.items()]
    b = max(batch_sizes)
    noisy = x.unsqueeze(0).expand(b, *x.shape) + 0.25 * torch.randn(b, *x.shape)
    flops = {"before": flops_per_sample(lambda: vlm.option_logprobs(noisy, [item] * b), b),
             "after": flops_per_sample(lambda: scorer.noisy_logprobs(x, b, sigma=0.25), b)}
    peak = matmul_gflops(vlm, b)
    best = {v: max(r["samples_per_s"] for r in rows if r["variant"] == v) for v in variants}
    before, after = list(variants)[0], list(variants)[-1]
    return {"samples": samples, "rows": rows, "best": best, "speedup": best[after] / best[before],
            "flops_per_sample": flops, "matmul_gflops": peak,
            "floor_samples_per_s": {kk: peak * 1e9 / f for kk, f in flops.items()},
            "share_of_floor": {before: best[before] / (peak * 1e9 / flops["before"]),
                               after: best[after] / (peak * 1e9 / flops["after"])}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny", help="configs/<name>.yaml or a YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one configuration key (repeatable), e.g. --set data.n_images=40")
    ap.add_argument("--model", default=None,
                    help="a zoo name (trained through the cache if missing) or a checkpoint dir; default: untrained tiny")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--gen-batch-sizes", default="1,8,32")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items", type=int, default=2, help="items certified for the per-item time")
    ap.add_argument("--samples", type=int, default=512, help="noisy samples per timed run of the side-by-side")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    safemed_lib.set_threads(args.threads)
    cfg = config.load(args.profile, args.overrides)
    size = cfg.data.image_size
    _, test = dataset.splits(cfg)
    items = test[: args.items]
    if args.model:
        vlm, model_name = zoo.load(args.model, cfg), str(args.model)
    else:
        corpus = [t for it in test[:200] for t in (it.question, *it.options)]
        vlm, model_name = models.build_tiny_vlm(corpus, seed=0, image_size=size), "untrained tiny VLM"
    from safemed_lib import data

    item = items[0]
    x = data.load_images([item], size=size)[0]
    n0, n = cfg.certify.n0, cfg.certify.n

    sweep = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        sweep.append({"classifier": "logprob", "batch_size": bs,
                      "samples_per_s": rate(certify.logprob_classifier(vlm, item), x, bs, args.repeats)})
    think_tokens = cfg.certify.max_new_tokens
    for label, prompt, tokens in (("generate", "nothink", args.max_new_tokens),
                                  ("generate-think", "think", think_tokens)):
        for bs in [int(b) for b in args.gen_batch_sizes.split(",")]:
            classify = certify.generation_classifier(vlm, item, prompt=prompt, max_new_tokens=tokens)
            sweep.append({"classifier": label, "batch_size": bs, "max_new_tokens": tokens,
                          "samples_per_s": rate(classify, x, bs, args.repeats)})
    kinds = ("logprob", "generate", "generate-think")
    best = {c: max(s["samples_per_s"] for s in sweep if s["classifier"] == c) for c in kinds}
    best_bs = {c: max((s for s in sweep if s["classifier"] == c), key=lambda s: s["samples_per_s"])["batch_size"]
               for c in kinds}

    side = side_by_side(vlm, item, x, [int(b) for b in args.batch_sizes.split(",")], args.samples, args.repeats)

    per_item = {}
    for method in ("logprob", "generate"):
        t0 = time.perf_counter()
        df = certify.certify_items(vlm, items, sigma=0.25, n0=n0, n=n, alpha=0.001, method=method,
                                   prompt="nothink", image_size=size, batch_size=best_bs[method],
                                   max_new_tokens=args.max_new_tokens, seed=0)
        per_item[method] = (time.perf_counter() - t0) / len(items)
        assert len(df) == len(items)

    result = {
        "benchmark": "bench_certify", "profile": cfg.profile, "overrides": args.overrides, "model": model_name,
        "image_size": size,
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.platform()})",
        "note": f"timed with {load_note()}",
        "max_new_tokens": {"nothink": args.max_new_tokens, "think": think_tokens},
        "sweep": sweep, "best_samples_per_s": best, "best_batch_size": best_bs,
        "fast_path_speedup": best["logprob"] / best["generate"],
        "speedup_vs_think_generation": best["logprob"] / best["generate-think"],
        "n0": n0, "n": n, "seconds_per_certified_item": per_item,
        "max_certifiable_radius_at_sigma_0.25": smoothing.max_certifiable_radius(0.25, n, 0.001),
        "fast_path_before_after": side,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "bench_certify.json", json.dumps(result, indent=2) + "\n")
    lines = [f"# bench_certify ({cfg.profile}, {model_name}, {size} px, {args.threads} thread)", "",
             result["note"] + ".", "",
             "| classifier | batch size | max new tokens | samples/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['classifier']} | {s['batch_size']} | {s.get('max_new_tokens', '-')} | {s['samples_per_s']:.1f} |"
              for s in sweep]
    lines += ["", f"- fast path speed-up (best logprob / best nothink generation): "
              f"**{result['fast_path_speedup']:.1f}x**; vs think generation with {think_tokens} new tokens: "
              f"**{result['speedup_vs_think_generation']:.1f}x** (" + (
                  "an untrained model never stops early: generation always runs to max new tokens, the worst case"
                  if not args.model else "a trained model stops at its end-of-turn token") + ")",
              f"- seconds per certified item at n0={n0}, n={n}: logprob {per_item['logprob']:.2f} s, "
              f"generate {per_item['generate']:.2f} s",
              f"- at the reference n0=100, n=100,000 the logprob path would need about "
              f"{100_100 / best['logprob'] / 60:.0f} min per item on this machine"]
    fl, fs = side["flops_per_sample"], side["floor_samples_per_s"]
    lines += ["", f"## The fast path before and after OptionScorer (end to end: noise, classifier, counts; "
              f"{side['samples']} samples per timed run, median of {args.repeats} interleaved repeats)", "",
              "| variant | batch size | samples/s |", "| --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['batch_size']} | {r['samples_per_s']:.1f} |" for r in side["rows"]]
    lines += ["", f"- speed-up, best batch size each: **{side['speedup']:.2f}x** (goal: at least 3x)",
              f"- FLOPs per sample: before {fl['before'] / 1e6:.1f} M, after {fl['after'] / 1e6:.1f} M; this core runs "
              f"the model's largest matrix product at {side['matmul_gflops']:.1f} GFLOP/s, so the floors are "
              f"{fs['before']:.0f} and {fs['after']:.0f} samples/s",
              "- share of its floor reached: " + ", ".join(f"{v} {100 * r:.0f}%" for v, r in side["share_of_floor"].items())]
    atomic_write_text(OUT / "bench_certify.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
