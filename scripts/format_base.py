"""Research: Med-R1's base for the tiny model, a format-only warm-up (issue #34).

    python scripts/format_base.py --modes think nothink [--steps 800] [--lr 3e-3]

Med-R1 starts from a model that has never been trained on the benchmark's answers. For every
prompt form this trains the zoo's ``medr1-warmup`` with ``medr1.warmup.format_only`` (the loss
skips the answer letter, drawn independently of the answer; think targets carry one fixed
rationale) from the tiny base, into ``--models`` (the base linked there from the profile's
models), and scores it on Med-R1's test questions by generation: accuracy, the share of answers
in the format, and chance. One row per form goes to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--modes", nargs="+", default=["think", "nothink"])
    p.add_argument("--steps", type=int, default=None, help="medr1.warmup.steps (default: the profile's)")
    p.add_argument("--lr", type=float, default=None, help="medr1.warmup.lr (default: the profile's)")
    p.add_argument("--models", type=Path, default=ROOT / "data" / "models" / "format_base")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "research" / "format_base.csv")
    args = p.parse_args(argv)

    import collections

    import pandas as pd
    import torch

    from safemed_lib import baselines, config, data, zoo
    from safemed_lib.experiments import medr1

    profile = config.load(args.profile)
    rows = []
    for mode in args.modes:
        models_dir = args.models / mode
        over = {"model.dir": str(models_dir), "medr1.warmup.format_only": True, "medr1.mode": mode}
        over.update({f"medr1.warmup.{k}": v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
        cfg = config.load(args.profile, over)
        models_dir.mkdir(parents=True, exist_ok=True)
        if not (models_dir / "base").exists():  # the profile's base, built there if missing
            zoo.ensure("base", profile)
            (models_dir / "base").symlink_to(zoo.run_dir("base", profile).resolve())
        items = medr1.test_items(cfg)
        df = medr1._evaluate(cfg, "medr1-warmup", items)
        vlm = zoo.load("medr1-warmup", cfg)
        with torch.no_grad():  # the letter distribution after "<answer>" (4-option questions)
            four = [it for it in items if len(it.options) == 4][:128]
            lp = vlm.option_logprobs(data.load_images(four, size=cfg.data.image_size), four, prompt="nothink")
        p_letters = torch.stack(lp).exp().mean(0)
        w = cfg.medr1.warmup
        rows.append({"mode": mode, "steps": w.steps, "lr": w.lr, "items": w.items, "n": len(df),
                     "accuracy": 100 * df["correct"].mean(), "valid": 100 * df["pred"].notna().mean(),
                     "chance": 100 * baselines.chance_level(items),
                     "greedy letters": dict(collections.Counter(df["pred"].fillna("none")).most_common()),
                     "p(A..D) after <answer>": [round(float(v), 3) for v in p_letters]})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
