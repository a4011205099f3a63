"""GRPO (Med-R1) on TRL's ``GRPOTrainer``: the dataset, the rewards, the config, a CSV log and resumable runs.

GRPO samples a group of ``num_generations`` completions per question, scores each with
Med-R1's two rewards (format 0/1 + accuracy 0/1, :mod:`safemed_lib.prompts`), and pushes the
policy towards completions that beat their group's mean: advantage ``(r - mean_G) / (std_G + 1e-4)``,
a k3 KL estimate to the starting policy weighted by ``beta``. Everything but the data and the
rewards is TRL 1.16's ``GRPOTrainer``; :func:`train_grpo` only builds its dataset and config
(with CPU-safe overrides) and adds a CSV log and resumable checkpoints. With an ``adversarial``
setting it trains SafeMed-R1's AT-GRPO (:mod:`safemed_lib.at_grpo`). Models are cached by name
through :mod:`safemed_lib.zoo`.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import PartialState
from PIL import Image
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from . import data, grpo_dist, models, prompts
from .at_grpo import ATGRPOTrainer, as_adversarial
from .grpo_noise import NoisyGRPOTrainer
from .records import atomic_write_text

MODES = prompts.MODES
LOG_NAME = "log.csv"
# friendly CSV column names for TRL's log keys (other numeric keys are kept under their TRL names)
LOG_COLUMNS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "completion_length",
    "kl": "kl",
    "loss": "loss",
    "learning_rate": "lr",
    "rewards/clean": "reward_clean",
    "rewards/adversarial": "reward_adv",
    "rewards/clean_frac_zero_std": "frac_zero_std_clean",
    "rewards/adversarial_frac_zero_std": "frac_zero_std_adv",
    "frac_reward_zero_std": "frac_zero_std",
    "adv/success_rate": "adv_success_rate",
    "adv/eps": "adv_eps",
    "adv/fraction": "adv_fraction",
    "adv/loss_start": "adv_loss_start",
    "adv/loss_adv": "adv_loss_adv",
    "adv/seconds": "adv_seconds",
    "step_time": "step_time",
}


# --------------------------------------------------------------------------- data and rewards
def build_dataset(items: Sequence[data.VQAItem], mode: str, image_size: int | None, *,
                  cache_dir: str | Path | None = None):
    """TRL's dataset for ``items``: a conversational ``prompt`` (user text =
    ``prompts.build_prompt(item, mode)``; TRL inserts the image block), ``image`` (PIL at
    ``image_size``), and the columns the rewards and the attack read: ``answer`` (letter),
    ``n_options``, ``question_id``, ``modality``, ``question_type``.

    Images are not held in memory: each original is resized once into the on-disk cache
    (:mod:`safemed_lib.data.cache`, under ``cache_dir``; later builds only look entries up), the
    dataset stores the entry's path in ``image_path``, and a transform opens it when a row is
    read, so every row still carries a PIL ``image`` with the pixels of
    ``to_pil(load_image(item.image_path, image_size))``. ``image_size=None`` keeps the originals
    (on the model's grid) and decodes them at each read. A bad original fails here, naming it.
    """
    from datasets import Dataset

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    items = list(items)
    if not items:
        raise ValueError("build_dataset: no training items")
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("build_dataset: duplicate question_id among the training items")
    entries: dict[str, str] = {}  # one cache look-up per image (several questions share one)
    for it in items:
        key = str(it.image_path)
        if key not in entries:
            entries[key] = key if image_size is None else str(
                data.cached_image_path(it.image_path, image_size, cache_dir))
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts.build_prompt(it, mode)}] for it in items],
        "image_path": [entries[str(it.image_path)] for it in items],
        "answer": [it.answer for it in items],
        "n_options": [len(it.options) for it in items],
        "question_id": ids,
        "modality": [it.modality for it in items],
        "question_type": [it.question_type for it in items],
    })
    return ds.with_transform(_ImageColumn(image_size is None))


class _ImageColumn:
    """``Dataset.with_transform`` function: adds the decoded PIL ``image`` of each row's ``image_path``
    (a cache entry, or with ``originals`` the original on the model's grid)."""

    def __init__(self, originals: bool):
        self.originals = originals

    def _open(self, path: str) -> Image.Image:
        return data.to_pil(data.load_image(path)) if self.originals else data.open_cached(path)

    def __call__(self, batch: dict) -> dict:
        if "image_path" not in batch:  # a read of other columns only (ds["answer"])
            return batch
        return {**batch, "image": [self._open(p) for p in batch["image_path"]]}


def reward_funcs(mode: str) -> list[Callable]:
    """Med-R1's rewards for ``mode``: the format reward, then the accuracy reward (TRL form)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return [prompts.FORMAT_REWARDS[mode], prompts.accuracy_reward]


# --------------------------------------------------------------------------- logging and checkpoints
class CSVLogCallback(TrainerCallback):
    """Rewrites ``<out_dir>/log.csv`` from the trainer's log history at every log (main process):
    one row per logged step. The history is restored from the checkpoint on resume, so the CSV of
    a resumed run has no gaps and no duplicates."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_log_csv(state.log_history, self.path)


class SaveAtEndCallback(TrainerCallback):
    """Checkpoint the final step too, so a finished run resumes to its end state."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control


def log_column(key: str) -> str:
    """The CSV column of a TRL log key: friendly names for the curves (``reward_format``,
    ``reward_accuracy``, ``reward_accuracy_adv`` ...), TRL's own name for the rest."""
    if key in LOG_COLUMNS:
        return LOG_COLUMNS[key]
    m = re.fullmatch(r"rewards/(\w+?)_reward/(mean|clean|adversarial)", key)
    if m:
        func = "format" if m.group(1).endswith("format") else m.group(1)
        return f"reward_{func}" + {"mean": "", "clean": "_clean", "adversarial": "_adv"}[m.group(2)]
    return key


def write_log_csv(history: list[dict], path: Path) -> Path:
    """One CSV row per logged training step from a trainer's ``log_history`` (atomic rewrite)."""
    table: dict[int, dict] = {}
    for h in history:
        if "step" not in h or not ("reward" in h or "loss" in h):
            continue
        rec = table.setdefault(int(h["step"]), {"step": int(h["step"])})
        for k, v in h.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool) or k.startswith("train_"):
                continue
            rec[log_column(k)] = v
    first = ["step", "reward", "reward_format", "reward_accuracy", "completion_length", "kl", "loss", "lr",
             "reward_clean", "reward_adv", "reward_accuracy_clean", "reward_accuracy_adv", "adv_success_rate",
             "frac_zero_std", "frac_zero_std_clean", "frac_zero_std_adv", "adv_eps", "adv_fraction",
             "adv_loss_start", "adv_loss_adv", "adv_seconds", "step_time"]
    present = {k for r in table.values() for k in r}
    cols = [c for c in first if c in present] + sorted(present - set(first))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for step in sorted(table):
        w.writerow(table[step])
    return atomic_write_text(path, buf.getvalue())


def read_log(out_dir: str | Path):
    """The training log of a run directory as a pandas DataFrame (one row per step)."""
    import pandas as pd

    path = Path(out_dir) / LOG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no training log at {path}")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- training
def _lora_kwargs(lora) -> dict | None:
    if lora is None or lora is False:
        return None
    if lora is True:
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    if isinstance(lora, dict):
        return dict(lora)
    raise TypeError(f"lora must be None, True or a dict of peft.LoraConfig arguments, got {type(lora).__name__}")


def grpo_config(out_dir: Path, recipe, *, seed: int, device: str, save_steps: int | None = None,
                lr_scheduler: str = "linear", warmup_steps: int = 0, gradient_checkpointing: bool = False,
                gradient_accumulation_steps: int = 1, max_grad_norm: float = 1.0, progress: bool = False,
                **overrides) -> GRPOConfig:
    """TRL's GRPOConfig with Med-R1's algorithm settings and this project's overrides.

    Med-R1: one update per generation batch (``num_iterations=1``), the original per-sequence
    GRPO loss (``loss_type="grpo"``), advantages scaled by the group std, k3 KL with ``beta``.
    CPU-safe: TRL defaults to bf16 and gradient checkpointing on; here they are on only on a CUDA
    device with bf16 support (checkpointing only if asked). ``recipe`` (``config.GRPORecipe``): steps,
    lr, group size, completions per device and step (``batch_size / num_generations`` questions),
    beta, temperature and completion length. ``save_steps``: default every quarter of the run.
    ``overrides`` go to GRPOConfig (e.g. ``ddp_timeout``). Under a DeepSpeed launch, building it
    sets up transformers' DeepSpeed config: build it BEFORE loading the model for ZeRO-3's zero.Init.
    """
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA device")
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    kw = dict(
        output_dir=str(out_dir), max_steps=recipe.steps, learning_rate=recipe.lr,
        num_generations=recipe.num_generations, per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, beta=recipe.beta, temperature=recipe.temperature,
        max_completion_length=recipe.max_completion_length, seed=seed,
        data_seed=seed, loss_type="grpo", scale_rewards="group", num_iterations=1,
        lr_scheduler_type=lr_scheduler, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
        use_cpu=not cuda, bf16=bf16, fp16=False, activation_checkpointing=bool(gradient_checkpointing and cuda),
        logging_steps=1, save_strategy="steps", save_steps=save_steps or max(1, recipe.steps // 4),
        save_total_limit=1, report_to="none", disable_tqdm=not progress, dataloader_num_workers=0,
        log_completions=False, remove_unused_columns=False,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)


def train_grpo(vlm, train_items: Sequence[data.VQAItem], recipe, *, mode: str = "think", out_dir: str | Path,
               seed: int = 0, adversarial=None, lora=None, resume: bool = True, image_size: int | None = None,
               save_steps: int | None = None, device: str | None = None, callbacks: Sequence[TrainerCallback] = (),
               config: GRPOConfig | None = None, save_dir: str | Path | None = None, **config_overrides):
    """GRPO (``adversarial=None``) or AT-GRPO on ``train_items`` with the recipe ``recipe``
    (``config.GRPORecipe``); returns ``vlm``, trained in place, with ``vlm.train_info`` (a dict:
    trainer class, global_step, num_processes, and for AT-GRPO hook_calls and attacked_images).

    ``mode``: the prompt and format reward ("think", "nothink", "think_after"). ``lora``: None
    (full fine-tuning), True (r=8 on q/v) or a dict of ``peft.LoraConfig`` arguments; the adapter
    is merged into the weights at the end. ``adversarial``: None, an ``at_grpo.AdversarialConfig``
    or a dict of its fields (then ``at_grpo.ATGRPOTrainer`` is used). ``recipe.noise_sigma`` > 0:
    Gaussian noise on every rollout's image (``grpo_noise.NoisyGRPOTrainer``; after the attack with AT-GRPO). ``image_size``: the square
    side images are fed at (default: ``vlm.image_size``). ``device``: "cpu" or "cuda" (default: where
    the model is). The run lives in ``out_dir``: ``log.csv`` (one row per step),
    ``checkpoint-<step>`` (TRL/transformers checkpoints, the newest kept, every ``save_steps`` and
    at the end) and, with ``beta > 0`` and full fine-tuning, ``ref/`` (the starting weights, the KL
    reference; :func:`grpo_dist.write_ref`). With ``resume`` a run continues from its newest
    checkpoint (a finished run just reloads its final weights). A half-precision model is upcast
    to float32 master weights in place first (bf16 autocast does the compute on CUDA). Other keyword arguments go to
    ``GRPOConfig`` (see :func:`grpo_config`); or pass ``config``, one built by :func:`grpo_config`
    (before loading the model, for DeepSpeed ZeRO-3). ``save_dir``: also save the final model
    there with the trainer's own save (every process must call; ZeRO-3/FSDP-safe). The trainer is
    freed before returning (notebooks train many models in one kernel).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if recipe.batch_size % recipe.num_generations:
        raise ValueError(f"batch_size ({recipe.batch_size} completions) must be a multiple of num_generations "
                         f"({recipe.num_generations})")
    if config is not None and (config_overrides or save_steps is not None or device is not None):
        raise ValueError("train_grpo: pass either a prebuilt `config` or save_steps / device / GRPOConfig "
                         "overrides, not both")
    adversarial = as_adversarial(adversarial)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_size = image_size or vlm.image_size
    train_items = list(train_items)
    with PartialState().local_main_process_first():  # one process per node fills the image cache (atomic writes)
        dataset = build_dataset(train_items, mode, image_size)

    # fp32 master weights (TRL upcasts only models it loads itself); GRPOConfig's bf16 autocasts on CUDA.
    # Under DeepSpeed the engine keeps fp32 master weights itself (and ZeRO-3's parameters are partitioned).
    if not grpo_dist.zero3_enabled():
        models.master_weights(vlm.model)
    lora_kw = _lora_kwargs(lora)
    if lora_kw is not None:
        vlm.add_lora(**lora_kw)
    elif recipe.beta > 0:
        # TRL builds the KL reference with from_pretrained(config._name_or_path): point it at a saved
        # copy of the STARTING weights (kept on resume, so the reference never moves)
        vlm.model.config._name_or_path = str(grpo_dist.write_ref(vlm, out_dir))

    if config is None:
        config = grpo_config(out_dir, recipe, seed=seed, device=device or vlm.device.type, save_steps=save_steps,
                             **config_overrides)
    trainer = _make_trainer(vlm, train_items, dataset, config, recipe, mode, adversarial, seed,
                            [CSVLogCallback(out_dir / LOG_NAME), SaveAtEndCallback(), *callbacks])
    last = get_last_checkpoint(str(out_dir)) if resume else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
        trainer.train(resume_from_checkpoint=last)
    if save_dir is not None and lora_kw is None:
        grpo_dist.save_final(trainer, vlm, save_dir, lora=False)
    vlm.model = trainer.accelerator.unwrap_model(trainer.model)
    if lora_kw is not None:
        vlm.merge_lora()
        if save_dir is not None:
            grpo_dist.save_final(trainer, vlm, save_dir, lora=True)
    vlm.model.eval()
    vlm.train_info = grpo_dist.train_info(trainer)
    grpo_dist.release(trainer)
    del trainer
    grpo_dist.collect()
    return vlm


def _make_trainer(vlm, items, dataset, config, recipe, mode, adversarial, seed, callbacks):
    """ATGRPOTrainer with an ``adversarial`` setting, else NoisyGRPOTrainer with ``recipe.noise_sigma``,
    else TRL's GRPOTrainer."""
    kwargs = dict(model=vlm.model, reward_funcs=reward_funcs(mode), args=config, train_dataset=dataset,
                  processing_class=vlm.processor,  # explicitly: AutoProcessor would return the tokenizer only
                  callbacks=callbacks)
    noise = dict(noise_sigma=getattr(recipe, "noise_sigma", 0.0), noise_draw=getattr(recipe, "noise_draw", "rollout"),
                 noise_seed=seed)
    if adversarial is not None:
        trainer = ATGRPOTrainer(**kwargs, vlm=vlm, items=items, mode=mode, adversarial=adversarial,
                                attack_seed=seed, **noise)
    elif noise["noise_sigma"]:
        trainer = NoisyGRPOTrainer(**kwargs, vlm=vlm, **noise)
    else:
        trainer = GRPOTrainer(**kwargs)
    if config.disable_tqdm:  # the Trainer then prints every log dict; the CSV has them already
        trainer.remove_callback(PrinterCallback)
    return trainer


# --------------------------------------------------------------------------- curves
def plot_curves(logs: dict[str, Any], path: str | Path | None = None, smooth: int = 5):
    """Med-R1-style training curves: reward (total, format, accuracy) and completion length per
    step, one line per run; with AT-GRPO runs also clean vs adversarial reward and the attack's
    success rate. ``logs``: ``{label: DataFrame from read_log or a run directory}``. Curves are
    smoothed with a centred rolling mean over ``smooth`` steps (raw values faint behind). Saves
    to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    frames = {k: (v if isinstance(v, pd.DataFrame) else read_log(v)) for k, v in logs.items()}
    adv = any("reward_adv" in df and df["reward_adv"].notna().any() for df in frames.values())
    panels = [("reward", "total reward"), ("reward_accuracy", "accuracy reward"),
              ("reward_format", "format reward"), ("completion_length", "completion length (tokens)")]
    if adv:
        panels += [("reward_clean|reward_adv", "clean (-) vs adversarial (--) reward"),
                   ("adv_success_rate", "attack success rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (col, title) in zip(axes[0], panels):
        for i, (label, df) in enumerate(frames.items()):
            color = f"C{i}"
            for j, c in enumerate(col.split("|")):
                if c not in df or df[c].isna().all():
                    continue
                y = df[c].astype(float)
                ax.plot(df["step"], y, color=color, alpha=0.2, lw=0.8)
                ax.plot(df["step"], y.rolling(smooth, center=True, min_periods=1).mean(), color=color,
                        ls="-" if j == 0 else "--", label=label if j == 0 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
                   bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
