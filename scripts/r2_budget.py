"""Research: Med-R2 stepwise / plain fine-tuning against its budget, on validation cases (issue #36).

    python scripts/r2_budget.py --steps 500 1500 3000 --lr 1e-3
    python scripts/r2_budget.py --steps 1500 --lr 1e-3 --binding     # sft-nothink's auxiliary terms too
    python scripts/r2_budget.py --steps 1500 --modes stepwise --seed 1

Budgets are chosen on validation, never on test: the profile's training cases are split per image
(``medr2.split_cases``, stratified by modality, seed ``cfg.seed + 1``) into fit and validation cases;
each run fine-tunes the zoo's ``sft-nothink`` on the fit cases (``medr2.ft``'s recipe with the given
steps and lr: one full run per budget, cosine schedule to 0) and answers every stage of the validation
cases answer-only (option-letter log-probs), with the gold earlier answers as context ("gold") and
without ("none"). Runs live under ``--out/<mode>-steps<S>-lr<lr>[-binding]-s<seed>/`` and resume;
one row per (run, context, stage) goes to ``--out/results.csv``.
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
    p.add_argument("--steps", type=int, nargs="+", required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--binding", action="store_true", help="train with sft.nothink's auxiliary binding terms")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other fields of medr2.ft's recipe (e.g. train_vision=false weight_decay=0.3)")
    p.add_argument("--modes", nargs="+", default=["stepwise", "plain"])
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (the split follows the profile)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "research" / "r2_budget")
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    from safemed_lib import config, medr2, sft, zoo

    torch.set_num_threads(args.threads)
    cfg = config.load(args.profile)
    train_cases, _ = medr2.cases_for(cfg)
    fit, val = medr2.split_cases(train_cases, test_frac=0.2, seed=cfg.seed + 1)
    print(f"{len(fit)} fit cases, {len(val)} validation cases", flush=True)
    rows = []
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.recipe)}
    tail = "".join(f"-{k}{v}" for k, v in extra.items())
    for steps in args.steps:
        for mode in args.modes:
            name = f"{mode}-steps{steps}-lr{args.lr:g}{'-binding' if args.binding else ''}{tail}-s{args.seed}"
            run = args.out / name
            recipe = cfg.medr2.ft.model_validate({**cfg.medr2.ft.model_dump(), **extra, "steps": steps, "lr": args.lr,
                                                  "binding": cfg.sft.nothink.binding if args.binding else None})
            model_dir = run / "model"
            if not (model_dir / "config.json").is_file():
                vlm = zoo.load("sft-nothink", cfg)
                vlm = sft.train_sft(vlm, medr2.training_items(fit, mode), recipe, variant="nothink",
                                    out_dir=run / "train", image_size=cfg.data.image_size, seed=args.seed,
                                    log_every=50, save_every=500)
                vlm.save(model_dir)
            vlm = zoo.load(str(model_dir), cfg)
            for context in ("gold", "none"):
                res = medr2.run_stepwise(vlm, val, context=context, prompt="nothink", image_size=cfg.data.image_size,
                                         method="logprob", records_dir=run / f"val-{context}", batch_size=32)
                acc = res.groupby("stage", sort=False)["correct"].mean().mul(100).round(1)
                for stage, a in acc.items():
                    rows.append({"run": name, "mode": mode, "steps": steps, "lr": args.lr, "binding": args.binding,
                                 "recipe": " ".join(args.recipe),
                                 "seed": args.seed, "context": context, "stage": stage, "accuracy": a,
                                 "n_cases": len(val)})
                print(name, context, acc.to_dict(), flush=True)
    out = args.out / "results.csv"
    old = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    new = pd.DataFrame(rows)
    if len(old):
        old = old[~old.set_index(["run", "context", "stage"]).index.isin(new.set_index(["run", "context", "stage"]).index)]
    pd.concat([old, new]).to_csv(out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
