"""AT-GRPO vs GRPO step time on the tiny model, and where the time goes.

Same model, data, batch (completions per step), group size and completion length for both; the
AT-GRPO run attacks ``--fraction`` of the questions of every generation batch with ``--pgd-steps``
PGD steps. Time is split by wrapping the trainer's methods with timers (benchmark only):

- attack:   at_grpo.ATGRPOTrainer._perturb (clean greedy pass when measured, PGD, rounding, success probe)
- rollouts: GRPOTrainer._generate (sampling the G completions per question)
- scoring:  the rest of _generate_and_score_completions (processor, reference log-probs, rewards)
- update:   the rest of the step (policy forward/backward of the loss, optimizer)

Writes benchmarks/out/bench_train.json and .md: the median over steps (after one warm-up step),
labelled with the load average it was taken at (contended when another job shared the cores).
Both runs start from the tiny base (``base.build`` with ``config.TinyBase``'s pretraining, or
``--copy-steps`` / ``--vision-steps``) and one ``config.GRPORecipe`` built from the options.

    .venv/bin/python benchmarks/bench_train.py --steps 6 --mode nothink
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_pgd import load_note  # noqa: E402


def _timed(cls, name: str, bucket: str, times: dict):
    orig = getattr(cls, name)

    def wrapper(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            times[bucket].append(time.perf_counter() - t0)

    setattr(cls, name, wrapper)
    return orig


def run(kind: str, args, vlm_path: Path, items, out: Path) -> dict:
    from trl import GRPOTrainer

    from safemed_lib import at_grpo, grpo, models
    from safemed_lib.config import GRPORecipe

    times: dict[str, list] = defaultdict(list)
    originals = [(GRPOTrainer, "_generate", _timed(GRPOTrainer, "_generate", "rollouts", times)),
                 (at_grpo.ATGRPOTrainer, "_perturb", _timed(at_grpo.ATGRPOTrainer, "_perturb", "attack", times)),
                 (GRPOTrainer, "_generate_and_score_completions",
                  _timed(GRPOTrainer, "_generate_and_score_completions", "gen_and_score", times)),
                 (GRPOTrainer, "training_step", _timed(GRPOTrainer, "training_step", "step", times))]
    try:
        adv = None
        if kind == "at-grpo":
            adv = dict(eps=8 / 255, alpha=2 / 255, steps=args.pgd_steps, fraction=args.fraction,
                       measure_success=not args.no_success)
        vlm = models.load_vlm(vlm_path, image_size=args.image_size)
        recipe = GRPORecipe(steps=args.steps, lr=1e-5, num_generations=args.g, batch_size=args.batch_size,
                            beta=args.beta, max_completion_length=args.max_len)
        grpo.train_grpo(vlm, items, recipe, mode=args.mode, out_dir=out / kind, seed=0, adversarial=adv,
                        resume=False, save_steps=10 ** 6)
    finally:
        for cls, name, orig in originals:
            setattr(cls, name, orig)
    n = len(times["step"])
    k = slice(1, None) if n > 1 else slice(0, None)  # drop the warm-up step
    med = {b: statistics.median(v[k]) if v[k] else 0.0 for b, v in times.items()}
    attack = med.get("attack", 0.0)
    rollouts = med.get("rollouts", 0.0)
    # ATGRPOTrainer's override runs _perturb, then GRPOTrainer's method (the timed one) via super()
    scoring = med.get("gen_and_score", 0.0) - rollouts
    update = med["step"] - med.get("gen_and_score", 0.0) - attack
    log = grpo.read_log(out / kind)  # the share of each step's completions that saw an attacked image
    share = float(log["adv_fraction"].iloc[k].mean()) if "adv_fraction" in log else 0.0
    return {"kind": kind, "steps_timed": len(times["step"][k]), "step_s": med["step"],
            "attack_s": attack, "rollouts_s": rollouts, "scoring_s": scoring, "update_s": update,
            "attacked_share": share}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--mode", default="nothink", choices=["think", "nothink", "think_after"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--no-success", action="store_true", help="skip the greedy success-rate probe")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--n-images", type=int, default=160)
    ap.add_argument("--copy-steps", type=int, default=None,
                    help="the base's copy pretraining steps (default: TinyBase's)")
    ap.add_argument("--vision-steps", type=int, default=None,
                    help="the base's vision pretraining steps (default: TinyBase's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args(argv)

    import torch

    import safemed_lib
    from bench_pgd import bench_split
    from safemed_lib import base
    from safemed_lib.config import TinyBase

    safemed_lib.set_threads(1)
    tiny = TinyBase(**{k: v for k, v in (("copy_steps", args.copy_steps), ("vision_steps", args.vision_steps))
                       if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, _ = bench_split(args.image_size, tmp / "bench", n_images=args.n_images)
        base.build(train, tiny, image_size=args.image_size, seed=0, out_dir=tmp / "base")
        path = tmp / "base" / "model"
        rows = [run(kind, args, path, train, tmp) for kind in ("grpo", "at-grpo")]
    g, a = rows
    result = {
        "benchmark": "bench_train", "load": load_note(), "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "base": tiny.model_dump(),
        "runs": rows, "at_grpo_over_grpo": a["step_s"] / g["step_s"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# AT-GRPO vs GRPO step time (tiny model, CPU, 1 thread)", "", f"Timed with {result['load']}.", "",
             f"Settings: {result['settings']}", "",
             "| run | step (s) | attack (s) | rollouts (s) | scoring (s) | update (s) | share attacked |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['step_s']:.3f} | {r['attack_s']:.3f} | {r['rollouts_s']:.3f} | "
                     f"{r['scoring_s']:.3f} | {r['update_s']:.3f} | {r['attacked_share']:.2f} |")
    lines += ["", f"AT-GRPO / GRPO step time: **{result['at_grpo_over_grpo']:.2f}x** (medians after one warm-up step)."]
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
