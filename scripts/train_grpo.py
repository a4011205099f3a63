"""GRPO / AT-GRPO from a YAML recipe, open-r1 style: ``--config recipe.yaml`` plus ``--key value`` overrides.

    python scripts/train_grpo.py --config configs/recipes/tiny_grpo.yaml --steps 20
    python scripts/train_grpo.py --config configs/recipes/tiny_at_grpo.yaml --adversarial.fraction 1.0
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/train_grpo.py \\
        --config configs/recipes/tiny_grpo.yaml --steps 2
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        scripts/train_grpo.py --config configs/recipes/paper_grpo.yaml

Recipe keys: ``output_dir``; data (``omnimedvqa_root`` or the embedded benchmark's ``bench_dir``,
``n_images``, ``image_size``, ``data_seed``, optional ``train_filter: {modality: CT}``); model
(``model_path``: a saved VLM or a Qwen2-VL checkpoint dir; null = a tiny untrained model, the
same on every process); everything else is a keyword of ``safemed_lib.grpo.train_grpo`` (``mode``,
``steps``, ``lr``, ``num_generations``, ``batch_size``, ``beta``, ``temperature``,
``max_completion_length``, ``lora``, ``adversarial: {eps, alpha, steps, fraction, ...}``, and
GRPOConfig fields). Values of overrides are parsed as YAML (``--lora null``, ``--beta 0.0``);
dotted keys reach nested dicts. The final model is saved to ``<output_dir>/model`` by the main
process, and a run resumes from ``<output_dir>/checkpoint-*``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA_KEYS = ("omnimedvqa_root", "bench_dir", "n_images", "image_size", "data_seed", "train_filter", "max_train_items")
MODEL_KEYS = ("model_path", "tiny_seed", "dtype")


def parse(argv: list[str] | None = None) -> dict:
    """The recipe (``--config``) with the ``--key value`` overrides applied."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML recipe (configs/recipes/*.yaml)")
    args, rest = ap.parse_known_args(argv)
    path = Path(args.config)
    if not path.is_file():
        ap.error(f"recipe {path} does not exist")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        ap.error(f"recipe {path} must be a mapping of keys to values")
    if len(rest) % 2:
        ap.error(f"overrides come in pairs --key value, got {rest}")
    for flag, value in zip(rest[::2], rest[1::2]):
        if not flag.startswith("--"):
            ap.error(f"expected --key, got {flag!r}")
        node, keys = recipe, flag[2:].replace("-", "_").split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                ap.error(f"override {flag}: {k} is not a mapping in the recipe")
        node[keys[-1]] = yaml.safe_load(value)
    return recipe


def main(argv: list[str] | None = None) -> Path:
    recipe = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from accelerate import PartialState

    import safemed_lib
    from safemed_lib import grpo, models, workbook
    from safemed_lib.paths import resolve

    safemed_lib.set_threads(int(recipe.pop("threads", 1)))
    out_dir = resolve(recipe.pop("output_dir"))
    d = {k: recipe.pop(k) for k in DATA_KEYS if k in recipe}
    m = {k: recipe.pop(k) for k in MODEL_KEYS if k in recipe}
    image_size = d.get("image_size", 112)
    device = recipe.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    # the same distributed state the trainer will use; the main process generates the benchmark first
    state = PartialState(cpu=not device.startswith("cuda"))
    with state.main_process_first():
        train, _ = workbook.dataset(d.get("omnimedvqa_root"), d.get("bench_dir", "data/bench/tiny"),
                                    d.get("n_images", 1600), image_size, d.get("data_seed", 0))
    for key, value in (d.get("train_filter") or {}).items():
        train = [it for it in train if getattr(it, key) == value]
    if d.get("max_train_items"):
        train = train[: int(d["max_train_items"])]
    if not train:
        raise SystemExit(f"no training items left after train_filter={d.get('train_filter')}")

    if m.get("model_path"):
        vlm = models.load_vlm(resolve(m["model_path"]), dtype=m.get("dtype"), image_size=image_size)
    else:  # deterministic in (corpus, seed): every process builds the same weights
        corpus = [f"{it.question} {' '.join(it.options)}" for it in train]
        vlm = models.build_tiny_vlm(corpus, seed=int(m.get("tiny_seed", 0)), image_size=image_size)
    if device.startswith("cuda"):
        vlm.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    vlm = grpo.train_grpo(vlm, train, out_dir=out_dir, device=device, image_size=image_size, **recipe)
    trainer = vlm.trainer
    if trainer.accelerator.is_main_process:
        vlm.save(out_dir / "model")
        (out_dir / "recipe.json").write_text(json.dumps({**recipe, **d, **m, "num_processes": trainer.accelerator.num_processes}, indent=2, default=str) + "\n")
        print(f"saved {out_dir / 'model'}; log: {out_dir / grpo.LOG_NAME}")
    trainer.accelerator.wait_for_everyone()
    return out_dir


if __name__ == "__main__":
    main()
