"""GRPO / AT-GRPO from a YAML recipe, open-r1 style: ``--config recipe.yaml`` plus ``--key value`` overrides.

    python scripts/train_grpo.py --config configs/recipes/tiny_grpo.yaml --grpo.steps 20
    python scripts/train_grpo.py --config configs/recipes/tiny_at_grpo.yaml --adversarial.fraction 1.0
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/train_grpo.py \\
        --config configs/recipes/tiny_grpo.yaml --grpo.steps 2
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        scripts/train_grpo.py --config configs/recipes/paper_grpo.yaml

The recipe is typed (:class:`TrainRecipe`, pydantic): an unknown or mistyped key is an error that
names it. Blocks:

- ``data``: ``omnimedvqa_root`` (a local OmniMedVQA copy) or the embedded benchmark's ``bench_dir``,
  ``n_images``; ``image_size``, ``data_seed`` (generation and per-image split), optional
  ``train_filter: {modality: CT}`` and ``max_train_items`` (0: all);
- ``model``: ``path`` (a saved VLM or a Qwen2-VL checkpoint dir; null = a tiny untrained model,
  the same on every process, built with ``tiny_seed``), ``dtype`` (the dtype weights load in; training
  keeps float32 master weights), ``attn_implementation``;
- ``grpo``: the run's ``config.GRPORecipe`` (steps, lr, batch_size, num_generations, beta,
  temperature, max_completion_length);
- ``adversarial`` (AT-GRPO; null or absent: plain GRPO): ``eps`` and ``alpha`` in 1/255 for an
  L-inf attack (8 means 8/255, as in every profile; L2: the radius of pixels in [0, 1]), ``steps``,
  ``norm``, ``fraction``, ``clean_steps``, ``ramp_steps``, ... (``at_grpo.AdversarialConfig``, which
  takes [0, 1] pixel units: :meth:`Adversarial.pixels` converts);
- top level: ``output_dir``, ``mode``, ``seed``, ``lora``, ``save_steps``,
  ``gradient_accumulation_steps``, ``gradient_checkpointing``, ``threads``, ``device``,
  ``ddp_timeout`` (seconds a collective may wait before the run fails; the process group's timeout).

Overrides name a key by its dotted path (``--grpo.steps 2``, ``--adversarial.fraction 1.0``,
``--data.train_filter.modality CT``, ``--seed 1``); values are read as YAML (``--lora null``,
``--adversarial null``).

Distributed runs: the process group is created with ``ddp_timeout``; the training config is built
BEFORE the model is loaded, so that under DeepSpeed ZeRO-3 (``zero3_init_flag``) ``from_pretrained``
partitions the weights as they load, and the model is then not moved to the GPU by this script. The
KL reference (``<output_dir>/ref``) is written once per node, atomically. The final model is saved to
``<output_dir>/model`` by the trainer's own save on every process (ZeRO-3 gathers the 16-bit
weights, FSDP the full state dict) with what ``models.load_vlm`` needs beside it; the main process
writes ``recipe.json`` (the resolved recipe and the process count). A run resumes from
``<output_dir>/checkpoint-*``.
"""
# no `from __future__ import annotations`: pydantic resolves the fields below when the file is loaded by path
import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safemed_lib.config import (Block, ConfigError, Count, GRPORecipe, Mode, Norm, PosFloat,  # noqa: E402
                                PosInt, load_file)

TEST_FRAC = 0.2  # share of the images held out per image (the profiles' data.test_frac): never trained on


class RecipeData(Block):
    omnimedvqa_root: str | None = None   # a local OmniMedVQA copy; None: the embedded benchmark
    bench_dir: str = "data/bench/tiny"   # where the embedded benchmark is generated
    n_images: PosInt = 1600              # images of the embedded benchmark
    image_size: Annotated[int, Field(ge=28, multiple_of=28)] = 112  # square side, on Qwen2-VL's 28-pixel grid
    data_seed: Count = 0                 # benchmark generation and the per-image split
    train_filter: dict[str, str] = {}    # keep training items whose attributes match ({modality: CT})
    max_train_items: Count = 0           # the first n training items (0: all)


class RecipeModel(Block):
    path: str | None = None       # a saved VLM or a Qwen2-VL checkpoint; None: a tiny untrained model
    tiny_seed: int = 0            # its weights' seed (the same on every process)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # the dtype weights load in (None: the
    # checkpoint's); training always keeps float32 master weights, with bf16 autocast on CUDA
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None  # None: transformers' default


class Adversarial(Block):
    """AT-GRPO's training attack. ``eps`` / ``alpha`` in 1/255 for L-inf (the profiles' unit), the
    L2 radius / step of pixels in [0, 1] for L2."""

    eps: PosFloat = 8
    alpha: PosFloat = 2
    steps: PosInt = 5
    norm: Norm = "linf"
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    clean_steps: Count = 0
    ramp_steps: Count = 0
    random_start: bool = True
    prompt: Mode | None = None
    target: Literal["auto", "answer", "clean_reasoning", "first_token", "margin"] = "auto"
    measure_success: bool = True
    success_every: PosInt = 10      # measure the attack's success rate every this many optimizer steps

    @model_validator(mode="after")
    def _linf_units(self):
        # below 1/255 an L-inf perturbation rounds to nothing on the 8-bit grid the trainer's images live on:
        # such an eps is a radius given in [0, 1] pixels (0.0314 for 8/255)
        if self.norm == "linf" and self.eps < 1:
            raise ValueError(f"eps={self.eps:g}: L-inf eps is in 1/255 (8 means 8/255), and an eps below 1/255 "
                             "leaves no perturbation on the 8-bit grid")
        return self

    def pixels(self):
        """The ``at_grpo.AdversarialConfig`` of this block, radius and step in [0, 1] pixel units."""
        from safemed_lib.at_grpo import AdversarialConfig

        scale = 1 / 255 if self.norm == "linf" else 1.0
        return AdversarialConfig(**{**self.model_dump(), "eps": self.eps * scale, "alpha": self.alpha * scale})


class TrainRecipe(Block):
    """One GRPO / AT-GRPO run of ``scripts/train_grpo.py``."""

    output_dir: str
    data: RecipeData = RecipeData()
    model: RecipeModel = RecipeModel()
    grpo: GRPORecipe = GRPORecipe()
    adversarial: Adversarial | None = None   # None: plain GRPO
    mode: Mode = "think"
    seed: Count = 0
    lora: bool | dict[str, Any] | None = None   # None / false: full fine-tuning; true: r=8 on q/v; a LoraConfig dict
    save_steps: PosInt | None = None            # None: every quarter of the run
    gradient_accumulation_steps: PosInt = 1
    gradient_checkpointing: bool = False        # on CUDA only
    threads: PosInt = 1                         # torch threads per process
    device: str | None = None                   # None: cuda when available, else cpu
    ddp_timeout: PosInt = 1800                  # seconds a collective waits (the process group's timeout)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """The recipe file with ``overrides`` (``{"grpo.steps": 2}``) applied (``config.load_file``): a
    :class:`ConfigError` naming the file or the override and the key for anything that does not fit."""
    if not Path(path).is_file():
        raise ConfigError(f"recipe {path} does not exist")
    return load_file(TrainRecipe, path, overrides, what="recipe")


def parse(argv: list[str] | None = None) -> TrainRecipe:
    """The recipe (``--config``) with the ``--key value`` overrides applied."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML recipe (configs/recipes/*.yaml)")
    args, rest = ap.parse_known_args(argv)
    if len(rest) % 2:
        ap.error(f"overrides come in pairs --key value, got {rest}")
    overrides = {}
    for flag, value in zip(rest[::2], rest[1::2]):
        if not flag.startswith("--"):
            ap.error(f"expected --key, got {flag!r}")
        overrides[flag[2:].replace("-", "_")] = yaml.safe_load(value)
    return load_recipe(args.config, overrides)


def main(argv: list[str] | None = None) -> Path:
    try:
        recipe = parse(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from accelerate import PartialState

    import safemed_lib
    from safemed_lib import dataset, grpo, grpo_dist
    from safemed_lib.paths import resolve

    safemed_lib.set_threads(recipe.threads)
    out_dir = resolve(recipe.output_dir)
    d, m = recipe.data, recipe.model
    device = recipe.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the distributed state the trainer will use, its process group created with the recipe's timeout
    # (the trainer's ddp_timeout would come too late: the group exists by then)
    state = PartialState(cpu=not device.startswith("cuda"), timeout=timedelta(seconds=recipe.ddp_timeout))
    with state.main_process_first():  # the main process generates the benchmark first
        items = dataset.load_items(d.omnimedvqa_root, d.bench_dir, d.n_images, d.image_size, d.data_seed)
    train = _train_items(items, d)
    # the training config BEFORE the model: under a DeepSpeed ZeRO-3 launch it sets up transformers'
    # DeepSpeed config, so that from_pretrained partitions the weights as they load (zero3_init_flag)
    config = grpo.grpo_config(out_dir, recipe.grpo, seed=recipe.seed, device=device, save_steps=recipe.save_steps,
                              gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                              gradient_checkpointing=recipe.gradient_checkpointing, ddp_timeout=recipe.ddp_timeout)
    vlm = _load_model(m, d, train, resolve)
    if device.startswith("cuda") and not grpo_dist.zero3_enabled():  # ZeRO-3 places its partitions itself
        vlm.to(f"cuda:{state.local_process_index}")

    adversarial = recipe.adversarial.pixels() if recipe.adversarial else None
    vlm = grpo.train_grpo(vlm, train, recipe.grpo, mode=recipe.mode, out_dir=out_dir, seed=recipe.seed,
                          adversarial=adversarial, lora=recipe.lora, image_size=d.image_size, config=config,
                          save_dir=out_dir / "model")
    if state.is_main_process:
        meta = {**recipe.model_dump(mode="json"), "n_train": len(train),
                "num_processes": vlm.train_info["num_processes"]}
        (out_dir / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"saved {out_dir / 'model'}; log: {out_dir / grpo.LOG_NAME}")
    state.wait_for_everyone()
    return out_dir


def _train_items(items, d: RecipeData) -> list:
    from safemed_lib import data

    train, _ = data.split_by_image(items, test_frac=TEST_FRAC, seed=d.data_seed)
    for key, value in d.train_filter.items():
        train = [it for it in train if getattr(it, key) == value]
    if d.max_train_items:
        train = train[: d.max_train_items]
    if not train:
        raise SystemExit(f"no training items left after train_filter={d.train_filter}")
    return train


def _load_model(m: RecipeModel, d: RecipeData, train: list, resolve):
    from safemed_lib import models

    if m.path:
        return models.load_vlm(resolve(m.path), dtype=m.dtype, image_size=d.image_size,
                               attn_implementation=m.attn_implementation)
    # deterministic in (corpus, seed): every process builds the same weights
    corpus = [f"{it.question} {' '.join(it.options)}" for it in train]
    return models.build_tiny_vlm(corpus, seed=m.tiny_seed, image_size=d.image_size)


if __name__ == "__main__":
    main()
