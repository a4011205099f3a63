"""The command line: evaluate a model, train one by name, print a profile, or run the notebooks.

    python -m safemed_lib eval --profile tiny --model sft-think --attack pgd --eps 8 --out sft-think.json
    python -m safemed_lib train --profile tiny atgrpo-nothink
    python -m safemed_lib config --profile smoke --set attack.eps=4
    python -m safemed_lib reproduce --profile tiny --only 03 05
"""
from __future__ import annotations

import argparse
import os
import sys


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", default="tiny", help="configs/<name>.yaml or a YAML path (default: tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one configuration key, e.g. --set attack.eps=4 (repeatable)")


def _config(args) -> "object":
    from . import config, set_threads

    cfg = config.load(args.profile, args.overrides)
    set_threads(cfg.threads)
    return cfg


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m safemed_lib", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="clean and attacked accuracy of one model on the test split")
    _common(ev)
    ev.add_argument("--model", required=True, help="a zoo name (sft-think, atgrpo-nothink, ...) or a checkpoint dir")
    ev.add_argument("--mode", choices=("think", "nothink", "think_after"), help="prompt form (default: from the name)")
    ev.add_argument("--n", type=int, help="test questions (default: the profile's eval.n; 0: all)")
    ev.add_argument("--bench-seed", type=int, help="evaluate on a benchmark generated with this seed")
    ev.add_argument("--attack", choices=("none", "pgd"), default="pgd")
    ev.add_argument("--norm", choices=("linf", "l2"), default="linf")
    ev.add_argument("--eps", type=float, default=8.0, help="radius: 1/255 for linf, [0,1] pixel units for l2")
    ev.add_argument("--steps", type=int, default=10)
    ev.add_argument("--restarts", type=int, default=1)
    ev.add_argument("--target", choices=("auto", "answer", "clean_reasoning", "first_token", "margin"), default="auto",
                    help="the attack's objective: the NLL of the answer (auto: after the clean reasoning for think "
                         "models) or of the clean first token, or the option-letter margin (answer-first models)")
    ev.add_argument("--method", choices=("generate", "logprob"), default="generate",
                    help="answers by greedy generation, or by the option-letter log-probs (answer-only)")
    ev.add_argument("--out", required=True, help="summary + per-item records (JSON)")

    tr = sub.add_parser("train", help="train (or find in the cache) models by zoo name")
    _common(tr)
    tr.add_argument("names", nargs="+")

    cf = sub.add_parser("config", help="print the resolved configuration of a profile (YAML)")
    _common(cf)

    sub.add_parser("reproduce", help="run the notebooks (see python -m safemed_lib.reproduce --help)",
                   add_help=False)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["reproduce"]:
        from . import reproduce

        return reproduce.main(argv[1:])
    args = ap.parse_args(argv)
    from .config import ConfigError

    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "train":
        from . import zoo

        for name in args.names:
            print(f"{name}: {zoo.ensure(name, cfg)}", flush=True)
        return 0
    from . import benchmark

    try:
        s = benchmark.benchmark(args.model, cfg, mode=args.mode, n=args.n, bench_seed=args.bench_seed,
                                attack=args.attack, norm=args.norm, eps=args.eps, steps=args.steps,
                                restarts=args.restarts, target=args.target, method=args.method, out=args.out)
    except benchmark.SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    objective = "" if args.target == "auto" else f" ({args.target})"
    threat = "" if s["attacked_acc"] is None else \
        f", {args.norm} {args.eps:g}{'/255' if args.norm == 'linf' else ''} PGD-{args.steps}{objective}: " \
        f"{s['attacked_acc']:.1%}"
    print(f"{s['model']} ({s['mode']}) on {s['n']} questions: clean {s['clean_acc']:.1%}{threat} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
