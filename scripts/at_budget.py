"""Research: AT-GRPO's (or AT-SFT's) clean and PGD accuracy against its training budget, on validation (issue #33).

    python scripts/at_budget.py --mode think --lr 3e-4 --steps 1500 --eval-at 250 500 1000 1500
    python scripts/at_budget.py --mode think --lr 3e-5 --steps 1500 --set safemed.eval.n=96
    python scripts/at_budget.py --method at-sft --mode think --lr 3e-4 --steps 1000 --eval-at 250 500 1000
    python scripts/at_budget.py --mode think --lr 3e-4 --recipe num_generations=8 --attack fraction=1.0

Recipes are chosen on validation, never on test: the SFT start is trained (from the zoo's base) on
the training split minus a per-image validation split (``dataset.validation``), AT-GRPO continues
(or AT-SFT, ``--method at-sft``: Madry-style supervised adversarial training with the AT-SFT
recipe; or ``--method grpo``, the same GRPO without the attack) from it on the same images with
the profile's training attack (``--attack key=value`` changes a field of it, ``--recipe key=value``
one of the GRPO or AT-SFT recipe), and snapshots at ``--eval-at`` steps are scored on up to
``safemed.eval.n`` validation questions, clean and under the profile's PGD (``safemed.eval``, as in
notebook 05). ``--seed`` seeds the training run only: the benchmark, the split and the SFT start
follow the profile's ``seed`` (changing that regenerates the benchmark). Everything lives under
``--out/[at-sft-|grpo-]<mode>-lr<lr>-s<seed>[-<changes>]/`` and resumes: the SFT start, the
training run (checkpoints), the snapshots and the per-item evaluation records. One row per snapshot
goes to ``results.csv`` there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _start(cfg, mode: str, fit: list, out: Path):
    """The SFT model of ``mode`` trained on ``fit`` only (the profile's recipe) from the zoo's base
    (pretrained on the question corpus and the images' scene attributes, never on answers), cached in ``out``."""
    from safemed_lib import runs, sft, zoo

    recipe = getattr(cfg.sft, mode)

    def train(run_dir):
        vlm = zoo.load("base", cfg)
        vlm = sft.train_sft(vlm, fit, recipe, variant=mode, out_dir=run_dir / "train", image_size=cfg.data.image_size,
                            seed=cfg.seed)
        vlm.save(run_dir / "model")
        return {"model": "model"}

    key = {"fit": runs.ids_digest(fit), "base": zoo.key("base", cfg), "recipe": recipe.model_dump(exclude=set() if recipe.noise_sigma else {"noise_sigma"}), "mode": mode,
           "seed": cfg.seed, "image_size": cfg.data.image_size}
    runs.cached(out / f"sft-{mode}-s{cfg.seed}", key, train)
    return out / f"sft-{mode}-s{cfg.seed}" / "model"


class Snapshots:
    """A TrainerCallback that saves the policy at the chosen optimizer steps (``vlm.save``)."""

    def __new__(cls, vlm, steps, out: Path):
        from transformers import TrainerCallback

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step in steps and not (out / f"step-{state.global_step}" / "model").is_dir():
                    vlm.save(out / f"step-{state.global_step}" / "model")
        return _Cb()


def _score(cfg, mode: str, path: Path, items: list, out: Path) -> dict:
    """Clean and PGD accuracy (%) of the model at ``path`` on ``items`` (records under ``out``)."""
    from safemed_lib import attacks, evaluate, models

    e = cfg.safemed.eval
    max_len = getattr(cfg.safemed.grpo, mode).max_completion_length
    vlm = models.load_vlm(path, image_size=cfg.data.image_size)
    ev = dict(prompt=mode, image_size=cfg.data.image_size, batch_size=e.batch_size, max_new_tokens=max_len)
    clean = evaluate.evaluate(vlm, items, records_path=out / "clean.jsonl", **ev)
    hook = attacks.pgd_perturb(vlm, prompt=mode, eps=e.eps / 255, alpha=e.alpha / 255, steps=e.steps, seed=cfg.seed,
                               clean_outputs=dict(zip(clean["question_id"], clean["output"])), max_new_tokens=max_len)
    pgd = evaluate.evaluate(vlm, items, records_path=out / f"pgd-{e.eps:g}-{e.steps}.jsonl", perturb=hook, **ev)
    return {"n": len(items), "clean_acc": 100 * clean["correct"].mean(), "pgd_acc": 100 * pgd["correct"].mean()}


def _changed(block, update: dict):
    """``block`` with the fields in ``update``, validated (an unknown field or a bad value is an error)."""
    return type(block).model_validate({**block.model_dump(), **update})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--method", choices=("at-grpo", "at-sft", "grpo"), default="at-grpo",
                    help="grpo: the same GRPO run without the attack (the equal-budget baseline)")
    ap.add_argument("--mode", choices=("think", "nothink"), default="think")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[250, 500, 1000, 1500])
    ap.add_argument("--seed", type=int, default=0, help="the training run's seed (the benchmark, split and SFT start "
                    "keep the profile's seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides key=value")
    ap.add_argument("--recipe", nargs="*", default=[], help="training recipe fields key=value")
    ap.add_argument("--attack", nargs="*", default=[], help="training attack fields key=value (eps, alpha in 1/255)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "research" / "at_budget"))
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from safemed_lib import config, dataset, evaluate, grpo, models, sft

    torch.set_num_threads(args.threads)
    cfg = config.load(args.profile, config.parse_overrides(args.set))
    train, _ = dataset.splits(cfg)
    fit, val = dataset.validation(train, cfg)
    changes = config.parse_overrides(args.recipe + args.attack)
    name = f"{args.mode}-lr{args.lr:g}-s{args.seed}" + "".join(f"-{k}{v}" for k, v in changes.items())
    out = Path(args.out) / (name if args.method == "at-grpo" else f"{args.method}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    start = _start(cfg, args.mode, fit, Path(args.out))

    attack = _changed(cfg.safemed.train_attack, config.parse_overrides(args.attack))
    adv = attack.pixels()
    steps = sorted(s for s in set(args.eval_at) if s <= args.steps)
    update = {"steps": args.steps, "lr": args.lr, **config.parse_overrides(args.recipe)}
    if args.method in ("at-grpo", "grpo"):
        recipe = _changed(getattr(cfg.safemed.grpo, args.mode), update)
        adv = {**adv, "ramp_steps": attack.ramp_steps} if args.method == "at-grpo" else None
        snapshot = lambda s: out / f"step-{s}" / "model"  # noqa: E731
        if not all(snapshot(s).is_dir() for s in steps):
            vlm = models.load_vlm(start, image_size=cfg.data.image_size)
            grpo.train_grpo(vlm, fit, recipe, mode=args.mode, out_dir=out / "run", seed=args.seed, adversarial=adv,
                            image_size=cfg.data.image_size, save_steps=min(250, args.steps),
                            callbacks=[Snapshots(vlm, set(steps), out)])
    else:
        recipe = _changed(cfg.safemed.at_sft.recipe(), update)
        snapshot = lambda s: out / "run" / f"ckpt-{s:06d}" / "model"  # noqa: E731
        if not all(snapshot(s).is_dir() for s in steps):
            vlm = models.load_vlm(start, image_size=cfg.data.image_size)
            sft.train_sft(vlm, fit, recipe, variant=args.mode, out_dir=out / "run", image_size=cfg.data.image_size,
                          seed=args.seed, adversarial=adv, save_every=250, keep_steps=steps)
    items = evaluate.subset(val, cfg.safemed.eval.n, seed=cfg.seed)  # the same questions for every run
    rows = [{"step": 0, **_score(cfg, args.mode, start, items, out / "step-0")}]
    rows += [{"step": s, **_score(cfg, args.mode, snapshot(s), items, out / f"step-{s}")} for s in steps]
    table = pd.DataFrame(rows).assign(method=args.method, mode=args.mode, lr=args.lr, seed=args.seed, n_fit=len(fit),
                                      changes=json.dumps(changes))
    table.to_csv(out / "results.csv", index=False)
    (out / "settings.json").write_text(json.dumps({"recipe": recipe.model_dump(), "attack": adv,
                                                   "eval": cfg.safemed.eval.model_dump()}, indent=2) + "\n")
    print(table.round({"clean_acc": 1, "pgd_acc": 1}).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
