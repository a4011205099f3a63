"""GRPO (Med-R1) and adversarial GRPO (SafeMed-R1's AT-GRPO) on TRL's ``GRPOTrainer``.

GRPO samples a group of ``num_generations`` completions per question, scores each with
Med-R1's two rewards (format 0/1 + accuracy 0/1, :mod:`safemed_lib.prompts`), and pushes the
policy towards completions that beat their group's mean: advantage ``(r - mean_G) / (std_G + 1e-4)``,
a k3 KL estimate to the starting policy weighted by ``beta``. Everything but the data and the
rewards is TRL 1.16's ``GRPOTrainer``; :func:`train_grpo` only builds its dataset and config
(with CPU-safe overrides) and adds a CSV log and resumable checkpoints.

AT-GRPO (:class:`ATGRPOTrainer`): before the rollouts of every generation batch, a fraction of the
questions get their image replaced by a PGD adversarial image computed against the CURRENT
policy (the teacher-forced NLL of the reference answer, :func:`attacks.vlm_answer_loss`, through
the model wrapper's exact differentiable preprocessing). Rollouts, rewards and the policy-gradient
loss of those questions then all use the perturbed image. The images reach TRL as PIL images, so
the adversarial image is rounded to the 8-bit grid first (:func:`attacks.round_8bit`): for an
L-inf budget that is a multiple of 1/255 the rounded image stays inside the eps-ball, because the
clean image is itself on the grid. Which questions are attacked, and the random start of PGD, are
a pure function of (seed, step, question ids), so every copy of a question in its group, on any
process, sees the same image.

The hook: ``GRPOTrainer._generate_and_score_completions`` (a private method; TRL is pinned to
1.16.0 in pyproject.toml). ``ATGRPOTrainer`` also wraps ``_calculate_rewards`` to log clean and
adversarial rewards separately, and raises at the first training step if either hook was not
called (a TRL upgrade that renames them fails loudly instead of silently training without attacks).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import trl
from PIL import Image
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from accelerate import PartialState
from trl import GRPOConfig, GRPOTrainer

from . import attacks, data, prompts, report
from .records import atomic_write_text

TRL_VERSION = "1.16.0"  # the version whose private hooks ATGRPOTrainer overrides
if trl.__version__ != TRL_VERSION:
    warnings.warn(f"safemed_lib.grpo was written against trl=={TRL_VERSION} (found {trl.__version__}); "
                  "ATGRPOTrainer overrides private GRPOTrainer methods and checks at run time that they "
                  "are still called")

MODES = prompts.MODES
LOG_NAME = "log.csv"
DONE_NAME = "done.json"
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
    "adv/success_rate": "adv_success_rate",
    "adv/eps": "adv_eps",
    "adv/fraction": "adv_fraction",
    "adv/loss_clean": "adv_loss_clean",
    "adv/loss_adv": "adv_loss_adv",
    "adv/seconds": "adv_seconds",
    "step_time": "step_time",
}


# --------------------------------------------------------------------------- data and rewards
def to_pil(x: torch.Tensor) -> Image.Image:
    """A (3,H,W) float image in [0,1] as an RGB PIL image, rounded to the 8-bit grid."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3,H,W) image, got shape {tuple(x.shape)}")
    arr = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def from_pil(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3,H,W) float tensor in [0,1] (exact for 8-bit images)."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def build_dataset(items: Sequence[data.VQAItem], mode: str, image_size: int | None):
    """TRL's dataset for ``items``: a conversational ``prompt`` (user text =
    ``prompts.build_prompt(item, mode)``; TRL inserts the image block), ``image`` (PIL at
    ``image_size``), and the columns the rewards and the attack read: ``answer`` (letter),
    ``n_options``, ``question_id``, ``modality``, ``question_type``."""
    from datasets import Dataset

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    items = list(items)
    if not items:
        raise ValueError("build_dataset: no training items")
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("build_dataset: duplicate question_id among the training items")
    cache: dict[str, Image.Image] = {}  # one decode per image (several questions share one)
    images = []
    for it in items:
        key = str(it.image_path)
        if key not in cache:
            cache[key] = to_pil(data.load_image(it.image_path, image_size))
        images.append(cache[key])
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts.build_prompt(it, mode)}] for it in items],
        "image": images,
        "answer": [it.answer for it in items],
        "n_options": [len(it.options) for it in items],
        "question_id": ids,
        "modality": [it.modality for it in items],
        "question_type": [it.question_type for it in items],
    })


def reward_funcs(mode: str) -> list[Callable]:
    """Med-R1's rewards for ``mode``: the format reward, then the accuracy reward (TRL form)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return [prompts.FORMAT_REWARDS[mode], prompts.accuracy_reward]


# --------------------------------------------------------------------------- adversarial settings
@dataclasses.dataclass
class AdversarialConfig:
    """What ATGRPOTrainer attacks, and how hard.

    eps, alpha: PGD radius and step in [0,1] pixel units (L-inf: 8/255 and 2/255 by default).
    steps: PGD steps per generation batch. norm: "linf" or "l2".
    fraction: share of the questions of each generation batch that get an adversarial image.
    clean_steps: optimizer steps trained clean before the first attack.
    ramp_steps: then eps (and alpha, proportionally) ramp linearly from eps/ramp_steps to eps.
    prompt: the prompt mode of the attack loss (None: the training mode).
    target: what the attack loss scores (``attacks.answer_targets``): "answer" (the reference
        answer block), "clean_reasoning" (the policy's greedy reasoning on the clean image, then
        the reference answer) or "auto" (answer for nothink, clean_reasoning otherwise).
    measure_success: per batch, greedy-decode attacked questions on the clean and the adversarial
        image and log the attack's success rate (correct -> wrong); costs two short generations.
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    fraction: float = 0.5
    clean_steps: int = 0
    ramp_steps: int = 0
    random_start: bool = True
    prompt: str | None = None
    target: str = "auto"
    measure_success: bool = True

    def __post_init__(self):
        if self.norm not in attacks.NORMS:
            raise ValueError(f"adversarial.norm must be one of {attacks.NORMS}, got {self.norm!r}")
        if not (0.0 <= self.fraction <= 1.0):
            raise ValueError(f"adversarial.fraction must be in [0, 1], got {self.fraction}")
        if self.eps < 0 or self.alpha <= 0:
            raise ValueError(f"adversarial needs eps >= 0 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"adversarial.steps must be an integer >= 1, got {self.steps}")
        if self.clean_steps < 0 or self.ramp_steps < 0:
            raise ValueError("adversarial.clean_steps and ramp_steps must be >= 0")
        if self.prompt is not None and self.prompt not in MODES:
            raise ValueError(f"adversarial.prompt must be one of {MODES} or None, got {self.prompt!r}")
        if self.target not in attacks.TARGETS:
            raise ValueError(f"adversarial.target must be one of {attacks.TARGETS}, got {self.target!r}")

    def schedule(self, step: int) -> tuple[float, float]:
        """(eps, alpha) at optimizer step ``step`` (0-based): 0 during the clean steps, then a
        linear ramp over ``ramp_steps``, then the full budget."""
        if step < self.clean_steps:
            return 0.0, self.alpha
        k = step - self.clean_steps
        scale = 1.0 if self.ramp_steps == 0 else min(1.0, (k + 1) / self.ramp_steps)
        return self.eps * scale, self.alpha * scale


def as_adversarial(adversarial) -> AdversarialConfig | None:
    """None, an AdversarialConfig, or a dict of its fields (profiles, recipes)."""
    if adversarial is None or isinstance(adversarial, AdversarialConfig):
        return adversarial
    if isinstance(adversarial, dict):
        unknown = set(adversarial) - {f.name for f in dataclasses.fields(AdversarialConfig)}
        if unknown:
            raise ValueError(f"adversarial: unknown keys {sorted(unknown)}")
        return AdversarialConfig(**adversarial)
    raise TypeError(f"adversarial must be None, a dict or an AdversarialConfig, got {type(adversarial).__name__}")


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from ``parts`` (same on every process and every run)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _seed_of(*parts: Any) -> int:
    return int(_unit(*parts) * 2 ** 62)


# --------------------------------------------------------------------------- the adversarial trainer
class ATGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose generation batches carry PGD adversarial images (see the module doc).

    Extra arguments: ``vlm`` (the model wrapper whose ``.model`` is the policy being trained; the
    attack runs through it, so it always sees the current weights), ``items`` (the training
    VQAItems, looked up by the dataset's ``question_id``), ``mode`` (the training prompt mode),
    ``adversarial`` (an :class:`AdversarialConfig`), ``attack_seed``.

    Logged per generation batch: ``rewards/clean`` and ``rewards/adversarial`` (total reward of
    the rollouts on clean and on attacked images), the same per reward function, ``adv/eps``,
    ``adv/fraction`` (share of rollouts attacked), ``adv/loss_clean`` / ``adv/loss_adv`` (the attack
    objective before and after), ``adv/success_rate`` (greedy answers flipped from correct to wrong
    among the attacked questions answered correctly on the clean image), ``adv/seconds``.
    """

    def __init__(self, *args, vlm, items: Sequence[data.VQAItem], mode: str,
                 adversarial: AdversarialConfig, attack_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.vlm = vlm
        self.items = {it.question_id: it for it in items}
        self.mode = mode
        self.adversarial = as_adversarial(adversarial)
        self.attack_seed = attack_seed
        self.hook_calls = {"generate_and_score": 0, "calculate_rewards": 0}
        self.attacked_images = 0  # adversarial images made so far (for tests and reports)
        self._adv_flags: list[bool] = []
        g = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if g % self.num_generations:
            raise ValueError(
                f"AT-GRPO needs whole groups on each process: per_device_train_batch_size x steps_per_generation "
                f"({g}) must be a multiple of num_generations ({self.num_generations}), so that every "
                "completion of a question is generated from the same adversarial image")

    # -- the hook: perturb the generation batch, then let TRL do the rest on the perturbed images
    def _generate_and_score_completions(self, inputs):
        self.hook_calls["generate_and_score"] += 1
        self._adv_flags = [False] * len(inputs)
        if self.model.training:
            inputs = self._perturb(inputs)
        return super()._generate_and_score_completions(inputs)

    def _perturb(self, inputs: list[dict]) -> list[dict]:
        """The generation batch with the attacked questions' images replaced (sets ``_adv_flags``)."""
        cfg, step = self.adversarial, self.state.global_step
        self._adv_flags = [False] * len(inputs)
        eps, alpha = cfg.schedule(step)
        self._log_metric("adv/eps", eps)
        qids = [row["question_id"] for row in inputs]
        chosen = sorted({q for q in qids if _unit(self.attack_seed, step, q) < cfg.fraction}) if eps > 0 else []
        if not chosen:
            self._log_metric("adv/fraction", 0.0)
            return inputs
        missing = [q for q in chosen if q not in self.items]
        if missing:
            raise KeyError(f"ATGRPOTrainer: question_id {missing[0]!r} of the training data is not among `items`")
        t0 = time.perf_counter()
        first: dict[str, dict] = {}
        for row in inputs:
            first.setdefault(row["question_id"], row)
        x = torch.stack([from_pil(first[q]["image"]) for q in chosen]).to(self.accelerator.device)
        batch = [self.items[q] for q in chosen]
        mode = cfg.prompt or self.mode
        n_tokens = self.args.max_completion_length
        model = self.vlm.model
        was_training = model.training
        model.eval()  # the attack must treat examples independently (no dropout noise in its gradient)
        try:
            clean_texts = None
            if cfg.measure_success or attacks._resolve_target(cfg.target, mode) == "clean_reasoning":
                clean_texts = self.vlm.generate(x, batch, prompt=mode, max_new_tokens=n_tokens)
            loss_fn = attacks.vlm_answer_loss(
                self.vlm, batch, prompt=mode, target=cfg.target, max_new_tokens=n_tokens,
                clean_outputs=None if clean_texts is None else dict(zip(chosen, clean_texts)))
            # per-question random starts: the same image for every copy of a question, on every process
            gens = [torch.Generator(device=x.device).manual_seed(_seed_of(self.attack_seed, step, q)) for q in chosen]
            x_adv = attacks.pgd(loss_fn, x, eps=eps, alpha=alpha, steps=cfg.steps, norm=cfg.norm,
                                random_start=cfg.random_start, generator=gens)
            # the trainer's processor gets PIL images: put the perturbation on the 8-bit grid by
            # rounding it toward zero, which keeps it inside the eps-ball (L-inf and L2)
            x_adv = attacks.round_8bit_toward(x_adv, x)
            with torch.no_grad():
                self._log_metric("adv/loss_clean", loss_fn(x).mean().item())
                self._log_metric("adv/loss_adv", loss_fn(x_adv).mean().item())
            if cfg.measure_success:
                adv_texts = self.vlm.generate(x_adv, batch, prompt=mode, max_new_tokens=n_tokens)
                self._log_success(clean_texts, adv_texts, batch)
        finally:
            model.train(was_training)
        adv_image = {q: to_pil(xa) for q, xa in zip(chosen, x_adv.cpu())}
        out = []
        for i, row in enumerate(inputs):
            if row["question_id"] in adv_image:
                row = {**row, "image": adv_image[row["question_id"]]}
                self._adv_flags[i] = True
            out.append(row)
        self.attacked_images += len(chosen)
        self._log_metric("adv/fraction", sum(self._adv_flags) / len(self._adv_flags))
        self._log_metric("adv/seconds", time.perf_counter() - t0)
        return out

    def _log_success(self, clean_texts: list[str], adv_texts: list[str], batch: list) -> None:
        ok_clean = [prompts.parse_answer(t, len(it.options)) == it.answer for t, it in zip(clean_texts, batch)]
        ok_adv = [prompts.parse_answer(t, len(it.options)) == it.answer for t, it in zip(adv_texts, batch)]
        self._log_metric("adv/greedy_acc_clean", float(np.mean(ok_clean)))
        self._log_metric("adv/greedy_acc_adv", float(np.mean(ok_adv)))
        if any(ok_clean):
            flips = sum(c and not a for c, a in zip(ok_clean, ok_adv))
            self._log_metric("adv/success_rate", flips / sum(ok_clean))

    # -- clean vs adversarial rewards (rewards_per_func is gathered over processes: gather the flags too)
    def _calculate_rewards(self, inputs, prompts_, completions, completion_ids_list):
        self.hook_calls["calculate_rewards"] += 1
        rewards_per_func = super()._calculate_rewards(inputs, prompts_, completions, completion_ids_list)
        if not self.model.training:
            return rewards_per_func
        flags = torch.tensor(self._adv_flags or [False] * len(inputs), device=rewards_per_func.device)
        flags = self.accelerator.gather(flags).bool()
        if flags.numel() != rewards_per_func.shape[0]:
            raise RuntimeError(f"ATGRPOTrainer: {flags.numel()} adversarial flags for "
                               f"{rewards_per_func.shape[0]} rewards; TRL's batch layout changed")
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights).nansum(dim=1)
        metrics = self._metrics["train"]
        for name, mask in (("clean", ~flags), ("adversarial", flags)):
            metrics[f"rewards/{name}"].append(total[mask].mean().item() if mask.any() else math.nan)
            for i, fname in enumerate(self.reward_func_names):
                col = rewards_per_func[mask, i]
                metrics[f"rewards/{fname}/{name}"].append(col.nanmean().item() if mask.any() else math.nan)
        return rewards_per_func

    def training_step(self, model, inputs, num_items_in_batch):
        out = super().training_step(model, inputs, num_items_in_batch)
        if self.hook_calls["generate_and_score"] == 0 or self.hook_calls["calculate_rewards"] == 0:
            raise RuntimeError(
                f"ATGRPOTrainer: trl {trl.__version__} did not call the hooks it overrides "
                f"(calls: {self.hook_calls}); the training step ran on CLEAN images. The hooks are private "
                f"GRPOTrainer methods of trl=={TRL_VERSION}: pin that version or port the overrides.")
        return out


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
             "adv_eps", "adv_fraction", "adv_loss_clean", "adv_loss_adv", "adv_seconds", "step_time"]
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


def grpo_config(out_dir: Path, *, steps: int, lr: float, num_generations: int, batch_size: int, beta: float,
                temperature: float, max_completion_length: int, seed: int, device: str, save_steps: int,
                lr_scheduler: str = "linear", warmup_steps: int = 0, gradient_checkpointing: bool = False,
                gradient_accumulation_steps: int = 1, max_grad_norm: float = 1.0, progress: bool = False,
                **overrides) -> GRPOConfig:
    """TRL's GRPOConfig with Med-R1's algorithm settings and this project's overrides.

    Med-R1: one update per generation batch (``num_iterations=1``), the original per-sequence
    GRPO loss (``loss_type="grpo"``), advantages scaled by the group std, k3 KL with ``beta``.
    CPU-safe: TRL defaults to bf16 and gradient checkpointing on; here they are on only on a CUDA
    device with bf16 support (checkpointing only if asked). ``batch_size`` counts completions per
    device and step (``batch_size / num_generations`` questions). ``overrides`` go to GRPOConfig.
    """
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA device")
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    kw = dict(
        output_dir=str(out_dir), max_steps=steps, learning_rate=lr, num_generations=num_generations,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        beta=beta, temperature=temperature, max_completion_length=max_completion_length, seed=seed,
        data_seed=seed, loss_type="grpo", scale_rewards="group", num_iterations=1,
        lr_scheduler_type=lr_scheduler, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
        use_cpu=not cuda, bf16=bf16, fp16=False, activation_checkpointing=bool(gradient_checkpointing and cuda),
        logging_steps=1, save_strategy="steps", save_steps=save_steps, save_total_limit=1, report_to="none",
        disable_tqdm=not progress, dataloader_num_workers=0, log_completions=False, remove_unused_columns=False,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)


def train_grpo(vlm, train_items: Sequence[data.VQAItem], *, mode: str = "think", steps: int = 100,
               lr: float = 1e-6, num_generations: int = 4, batch_size: int = 8, beta: float = 0.04,
               temperature: float = 1.0, max_completion_length: int = 256, lora=None,
               out_dir: str | Path, seed: int = 0, adversarial=None, resume: bool = True,
               image_size: int | None = None, save_steps: int | None = None, device: str | None = None,
               callbacks: Sequence[TrainerCallback] = (), **config_overrides):
    """GRPO (``adversarial=None``) or AT-GRPO on ``train_items``; returns ``vlm``, trained in place.

    ``mode``: the prompt and format reward ("think", "nothink", "think_after"). ``lora``: None
    (full fine-tuning), True (r=8 on q/v) or a dict of ``peft.LoraConfig`` arguments; the adapter
    is merged into the weights at the end. ``adversarial``: None, an :class:`AdversarialConfig` or
    a dict of its fields (then :class:`ATGRPOTrainer` is used). ``image_size``: the square side
    images are fed at (default: ``vlm.image_size``). ``device``: "cpu" or "cuda" (default: where
    the model is). The run lives in ``out_dir``: ``log.csv`` (one row per step),
    ``checkpoint-<step>`` (TRL/transformers checkpoints, the newest kept, every ``save_steps`` and
    at the end) and, with ``beta > 0`` and full fine-tuning, ``ref/`` (the starting weights, the KL
    reference). With ``resume`` a run continues from its newest checkpoint (a finished run just
    reloads its final weights). Other keyword arguments go to ``GRPOConfig`` (see
    :func:`grpo_config`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("steps", steps), ("num_generations", num_generations), ("batch_size", batch_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_generations < 2:
        raise ValueError("num_generations must be >= 2 (GRPO's advantage compares completions within a group)")
    if batch_size % num_generations:
        raise ValueError(f"batch_size ({batch_size} completions) must be a multiple of num_generations "
                         f"({num_generations})")
    adversarial = as_adversarial(adversarial)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or vlm.device.type
    image_size = image_size or vlm.image_size
    train_items = list(train_items)
    dataset = build_dataset(train_items, mode, image_size)

    lora_kw = _lora_kwargs(lora)
    if lora_kw is not None:
        vlm.add_lora(**lora_kw)
    elif beta > 0:
        # TRL builds the KL reference with from_pretrained(config._name_or_path): point it at a saved
        # copy of the STARTING weights (kept on resume, so the reference never moves).
        # Under accelerate the main process writes it while the others wait, then they find it.
        ref = out_dir / "ref"
        with PartialState().main_process_first():
            if not (ref / "config.json").is_file():
                if get_last_checkpoint(str(out_dir)) is not None:
                    raise RuntimeError(f"{out_dir} has checkpoints but no ref/ (the KL reference); remove the "
                                       "run directory to start over")
                vlm.save(ref)
        vlm.model.config._name_or_path = str(ref)

    config = grpo_config(out_dir, steps=steps, lr=lr, num_generations=num_generations, batch_size=batch_size,
                         beta=beta, temperature=temperature, max_completion_length=max_completion_length,
                         seed=seed, device=device, save_steps=save_steps or max(1, steps // 4),
                         **config_overrides)
    kwargs = dict(model=vlm.model, reward_funcs=reward_funcs(mode), args=config, train_dataset=dataset,
                  processing_class=vlm.processor,  # explicitly: AutoProcessor would return the tokenizer only
                  callbacks=[CSVLogCallback(out_dir / LOG_NAME), SaveAtEndCallback(), *callbacks])
    if adversarial is None:
        trainer = GRPOTrainer(**kwargs)
    else:
        trainer = ATGRPOTrainer(**kwargs, vlm=vlm, items=train_items, mode=mode, adversarial=adversarial,
                                attack_seed=seed)
    if config.disable_tqdm:  # the Trainer then prints every log dict; the CSV has them already
        trainer.remove_callback(PrinterCallback)
    last = get_last_checkpoint(str(out_dir)) if resume else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
        trainer.train(resume_from_checkpoint=last)
    vlm.model = trainer.accelerator.unwrap_model(trainer.model)
    if lora_kw is not None:
        vlm.merge_lora()
    vlm.model.eval()
    vlm.trainer = trainer  # for inspection (hook counts, metrics); not saved
    return vlm


def _fingerprint(settings: dict, train_items: Sequence[data.VQAItem]) -> str:
    ids = hashlib.sha256("\n".join(sorted(it.question_id for it in train_items)).encode()).hexdigest()
    blob = json.dumps({**settings, "train_items": ids}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_grpo(models_dir: str | Path, name: str, base: Callable[[], Any] | Any,
                train_items: Sequence[data.VQAItem], *, base_id: str, **train_kwargs):
    """Train a GRPO / AT-GRPO run once and cache it: ``<models_dir>/<name>/model`` plus a done
    marker holding the settings' fingerprint; later calls with the same settings just load it.

    ``base``: the starting VLM, or a zero-argument function returning it (called only when training
    is needed). ``base_id``: a string naming the starting point (e.g. the SFT checkpoint path), part
    of the fingerprint. Different settings retrain in a fresh run directory. ``train_kwargs`` go to
    :func:`train_grpo` (``out_dir`` is ``<models_dir>/<name>/run``).
    """
    from . import models

    root = Path(models_dir) / name
    adv = train_kwargs.get("adversarial")
    settings = {**{k: v for k, v in train_kwargs.items() if k not in ("callbacks", "progress")},
                "adversarial": dataclasses.asdict(as_adversarial(adv)) if adv is not None else None,
                "base": base_id, "trl": trl.__version__}
    fp = _fingerprint(settings, list(train_items))
    done = root / DONE_NAME
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fp and (root / "model").is_dir():
        return models.load_vlm(root / "model")
    if root.exists():  # a different or unfinished run: keep an unfinished run of the same settings
        marker = root / "fingerprint.txt"
        if not (marker.is_file() and marker.read_text().strip() == fp):
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "fingerprint.txt", fp + "\n")
    vlm = base() if callable(base) else base
    t0 = time.perf_counter()
    vlm = train_grpo(vlm, train_items, out_dir=root / "run", **train_kwargs)
    seconds = time.perf_counter() - t0
    if (root / "model").exists():
        shutil.rmtree(root / "model")
    vlm.save(root / "model")
    atomic_write_text(done, json.dumps({"fingerprint": fp, "settings": settings, "seconds": seconds},
                                       indent=2, default=str) + "\n")
    return vlm


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


# --------------------------------------------------------------------------- Med-R1's generalization protocol
def _cell_dir(path: Path, fingerprint: str) -> Path:
    """``path``, emptied first unless it holds a run with this fingerprint (a cache of other settings)."""
    marker = path / "fingerprint.txt"
    if path.exists() and not (marker.is_file() and marker.read_text().strip() == fingerprint):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint + "\n")
    return path


def _evaluate_cached(vlm_fn: Callable[[], Any], items, records: Path, **eval_kwargs):
    """``evaluate.evaluate`` with per-item records in ``records`` (resumable). The model is built
    (``vlm_fn()``, which may train it) only when some item is not recorded yet."""
    from . import evaluate
    from .records import Records

    recorded = Records(records).done() if records.exists() else set()
    missing = any(it.question_id not in recorded for it in items)
    return evaluate.evaluate(vlm_fn() if missing else _Recorded(), items, records_path=records, **eval_kwargs)


class _Recorded:
    """Stands in for a VLM when every result is already recorded (evaluate() then only reads)."""

    class model:  # noqa: N801
        @staticmethod
        def eval():
            return None


def _slug(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", group).strip("-").lower()


def generalization_runs(models_dir: str | Path, train: Sequence[data.VQAItem], test: Sequence[data.VQAItem], *,
                        by: str, base: Callable[[], Any], base_id: str, mode: str, image_size: int,
                        sft_kwargs: dict, grpo_kwargs: dict, seed: int = 0, eval_batch_size: int = 64,
                        max_new_tokens: int = 16, progress: Callable[[str], None] | None = print):
    """Med-R1's protocol: for every group of ``data.cross_splits(train, test, by)`` train an SFT
    and a GRPO model on that group's training items from the same ``base``, and evaluate both
    (and the base) on ALL ``test`` items (greedy generation with the ``mode`` prompt).

    ``base``: zero-argument function returning a fresh copy of the starting VLM; ``base_id``
    names it in the caches. ``sft_kwargs``: ``steps, lr, batch_size`` of ``sft.train_sft``;
    ``grpo_kwargs``: keywords of :func:`train_grpo`. Models and per-item evaluation records are
    cached under ``<models_dir>/gen-<by>/`` (``sft-<group>``: train_sft's resumable run;
    ``grpo-<group>``: :func:`ensure_grpo`), keyed by a fingerprint of the settings, the base and
    the training items, so a rerun only reads the records back. Returns (per-item results with
    ``method`` = "base" / "SFT" / "GRPO" and ``train_group`` added to evaluate's rows, seconds per run).
    """
    import pandas as pd

    from . import sft

    root = Path(models_dir) / f"gen-{by.replace('_', '-')}"
    ev = dict(prompt=mode, image_size=image_size, batch_size=eval_batch_size, max_new_tokens=max_new_tokens)
    test = list(test)
    base_dir = _cell_dir(root / "base", _fingerprint({"base": base_id, **ev}, test))
    frames = [_evaluate_cached(base, test, base_dir / "eval.jsonl", **ev).assign(method="base", train_group="(base)")]
    times = []
    for group, (items, _) in data.cross_splits(train, test, by=by).items():
        fp = _fingerprint({"base": base_id, "mode": mode, "image_size": image_size, "seed": seed, **sft_kwargs,
                           "eval": ev}, items)
        cell = _cell_dir(root / f"sft-{_slug(group)}", fp)

        def sft_model():  # train_sft resumes an interrupted run and reloads a finished one
            return sft.train_sft(base(), items, variant=mode, image_size=image_size, out_dir=cell / "run",
                                 seed=seed, log_every=max(1, sft_kwargs["steps"] // 10), save_every=10 ** 6,
                                 **sft_kwargs)

        t0 = time.perf_counter()
        frames.append(_evaluate_cached(sft_model, test, cell / "eval.jsonl", **ev)
                      .assign(method="SFT", train_group=group))
        times.append({"method": "SFT", "train_group": group, "seconds": time.perf_counter() - t0})

        name, kw = f"grpo-{_slug(group)}", {**grpo_kwargs, "mode": mode, "image_size": image_size, "seed": seed}
        records = root / name / f"eval-{_fingerprint({'base': base_id, **kw, 'eval': ev}, items)}.jsonl"
        t0 = time.perf_counter()
        frames.append(_evaluate_cached(lambda: ensure_grpo(root, name, base, items, base_id=base_id, **kw),
                                       test, records, **ev).assign(method="GRPO", train_group=group))
        times.append({"method": "GRPO", "train_group": group, "seconds": time.perf_counter() - t0})
        if progress:
            acc = [f"{100 * f['correct'].mean():.1f}%" for f in frames[-2:]]
            progress(f"{by}={group}: {len(items)} training items; accuracy on all test items: "
                     f"SFT {acc[0]}, GRPO {acc[1]} ({times[-2]['seconds'] + times[-1]['seconds']:.0f} s)")
    return pd.concat(frames, ignore_index=True), pd.DataFrame(times)


def generalization_matrix(results, by: str):
    """Accuracy (%) matrices from :func:`generalization_runs`' results: ``{method: DataFrame}``
    with rows = training group, columns = test group (+ "All"); the base model is one row."""
    import pandas as pd

    groups = data.MODALITIES if by == "modality" else data.QUESTION_TYPES
    out = {}
    for method, df in results.groupby("method", sort=False):
        m = (df.groupby(["train_group", by])["correct"].mean().unstack(by) * 100)
        cols = [g for g in groups if g in m.columns]
        m = m[cols]
        m["All"] = df.groupby("train_group")["correct"].mean() * 100
        rows = [g for g in groups if g in m.index] + [r for r in m.index if r not in groups]
        out[method] = m.loc[rows]
    return out


def generalization_gains(matrices: dict) -> "pd.DataFrame":
    """Med-R1's headline numbers: the mean over all (train, test) cells of each method's accuracy
    minus the base's accuracy on the test group, and GRPO minus SFT (percentage points)."""
    import pandas as pd

    base = matrices["base"].drop(columns="All").iloc[0]
    rows = []
    for method in ("SFT", "GRPO"):
        m = matrices[method].drop(columns="All")
        rows.append({"comparison": f"{method} - base", "mean gain (points)": float((m - base).stack().mean()),
                     "diagonal (in-group) gain": float(pd.Series([m.loc[g, g] - base[g] for g in m.index
                                                                   if g in m.columns]).mean()),
                     "off-diagonal gain": float(pd.Series([m.loc[g, h] - base[h] for g in m.index
                                                            for h in m.columns if g != h]).mean())})
    d = matrices["GRPO"].drop(columns="All") - matrices["SFT"].drop(columns="All")
    rows.append({"comparison": "GRPO - SFT", "mean gain (points)": float(d.stack().mean()),
                 "diagonal (in-group) gain": float(pd.Series([d.loc[g, g] for g in d.index if g in d.columns]).mean()),
                 "off-diagonal gain": float(pd.Series([d.loc[g, h] for g in d.index for h in d.columns
                                                       if g != h]).mean())})
    return pd.DataFrame(rows).set_index("comparison")


def generalization_tests(results, alpha: float = 0.05) -> "pd.DataFrame":
    """Per training group, paired tests (``evaluate.paired_test``: the accuracy difference on all
    test questions with its interval and the exact McNemar p-value) of SFT vs the base, GRPO vs
    the base and GRPO vs SFT. ``results``: :func:`generalization_runs`' per-item results. One row
    per (train_group, comparison), in the order the groups were trained."""
    import pandas as pd

    from . import evaluate

    base = results[results["method"] == "base"]
    rows = []
    for group in results.loc[results["method"] != "base", "train_group"].unique():
        cell = {m: results[(results["method"] == m) & (results["train_group"] == group)] for m in ("SFT", "GRPO")}
        for name, a, b in (("SFT - base", base, cell["SFT"]), ("GRPO - base", base, cell["GRPO"]),
                           ("GRPO - SFT", cell["SFT"], cell["GRPO"])):
            t = evaluate.paired_test(a, b, alpha=alpha)
            rows.append({"train_group": group, "comparison": name, "diff (points)": t["diff"],
                         "ci_low": t["ci_low"], "ci_high": t["ci_high"], "p_value": t["p_value"], "n": t["n"]})
    return pd.DataFrame(rows)


MATERIAL_GAIN = 10.0  # points: the gain a paper's claim of a large improvement needs on our runs
GENERALIZATION_CLAIMS = {"modality": "medr1.cross_modality_gain", "question_type": "medr1.cross_qtype_gain"}


def generalization_claims(matrices: dict, chance: float, *, min_gain: float = MATERIAL_GAIN, detail: str = ""
                          ) -> list[dict]:
    """Med-R1's two headline claims tested on notebook 04's matrices, as keyword arguments for
    ``report.record_claim`` (claim_id, ours, holds, detail).

    ``matrices``: {by: :func:`generalization_matrix` output} for "modality" and/or "question_type";
    ``chance``: the chance accuracy (%). The claim holds when GRPO's mean gain over the base is at
    least ``min_gain`` points (the paper's is about 30; 10 is the same material gain notebook 05
    asks of AT-GRPO). If GRPO's mean accuracy is within 10 points of chance, its models do not read
    the image, and the verdict is None ("cannot tell")."""
    claims = []
    for by, claim_id in GENERALIZATION_CLAIMS.items():
        if by not in matrices:
            continue
        g = generalization_gains(matrices[by])["mean gain (points)"]
        acc = float(matrices[by]["GRPO"]["All"].mean())
        claims.append(dict(
            claim_id=claim_id, holds=bool(g["GRPO - base"] >= min_gain) if report.reads_image(acc, chance) else None,
            ours=f"GRPO - base {g['GRPO - base']:+.2f} points (SFT - base {g['SFT - base']:+.2f}; "
                 f"GRPO mean accuracy {acc:.1f}%)",
            detail=f"{detail}; holds = GRPO at least {min_gain:g} points above the base on average; "
                   f"chance {chance:.1f}%"))
    return claims


def plot_generalization(matrices: dict, by: str, path: str | Path | None = None):
    """Med-R1's figure: the SFT and GRPO accuracy matrices and the GRPO - SFT improvement heatmap."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sft_m, grpo_m = (matrices[k].drop(columns="All") for k in ("SFT", "GRPO"))
    diff = grpo_m - sft_m
    n = len(sft_m.columns)
    fig, axes = plt.subplots(1, 3, figsize=(4.2 * 3 + 1, 0.45 * n + 2.2))
    short = lambda s: s.replace("Other Biological Attributes", "Other Attr.").replace(" Identification", " Id.")  # noqa: E731
    for ax, (title, m, cmap, center) in zip(axes, (("SFT", sft_m, "Blues", None), ("GRPO", grpo_m, "Blues", None),
                                                   ("GRPO - SFT (points)", diff, "RdBu", 0.0))):
        kw = dict(vmin=0, vmax=100) if center is None else dict(center=0.0)
        sns.heatmap(m.rename(index=short, columns=short), annot=True, fmt=".0f", cmap=cmap, cbar=False, ax=ax,
                    annot_kws={"fontsize": 7}, **kw)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"test {by.replace('_', ' ')}")
        ax.set_ylabel(f"train {by.replace('_', ' ')}")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def ensure_warmup(models_dir: str | Path, train: Sequence[data.VQAItem], *, mode: str, n_items: int, steps: int,
                  lr: float, batch_size: int, image_size: int, seed: int = 0, model_path=None):
    """The "base" of the generalization protocol for a model without pretraining: a short SFT of
    the untrained base (``sft.ensure_base``) on ``n_items`` training items drawn across ALL groups
    (a small general split standing in for Qwen2-VL's general pretraining; it teaches the answer
    format), cached in ``<models_dir>/gen-warmup``. With ``model_path`` (a pretrained checkpoint,
    the paper profile) or ``steps=0`` the base itself is used, as in Med-R1.
    Returns (a zero-argument function giving a fresh copy from disk, an id of that model); the
    function pickles, so it can go to a worker process (``workbook.background``)."""
    from . import evaluate, models, sft

    base = partial(sft.ensure_base, models_dir, train, image_size=image_size, seed=seed, model_path=model_path)
    first = base()
    base_id = sft.base_id(models_dir, model_path)
    if model_path or steps == 0:
        return base, f"base:{base_id}"
    items = evaluate.subset(train, n_items, seed=seed)
    fp = _fingerprint({"mode": mode, "steps": steps, "lr": lr, "batch_size": batch_size, "image_size": image_size,
                       "seed": seed, "base": base_id}, items)
    run = _cell_dir(Path(models_dir) / "gen-warmup", fp) / "run"
    if not (run / "done.json").is_file():  # train_sft resumes an interrupted run
        sft.train_sft(first, items, variant=mode, steps=steps, lr=lr, batch_size=batch_size, image_size=image_size,
                      out_dir=run, seed=seed, log_every=max(1, steps // 10), save_every=max(1, steps // 2))
    path = run / json.loads((run / "done.json").read_text())["model"]
    return partial(models.load_vlm, path, image_size=image_size), f"warmup:{fp}"


# --------------------------------------------------------------------------- SafeMed-R1's robustness table
def robustness_eval(vlm_fn: Callable[[], Any], items: Sequence[data.VQAItem], *, run_dir: str | Path, mode: str,
                    image_size: int, eps: float, alpha: float, steps: int, seed: int = 0, batch_size: int = 32,
                    max_new_tokens: int = 96):
    """Clean and PGD (L-inf ``eps``, step ``alpha``, ``steps`` steps, 8-bit rounded; the attack
    ascends the NLL of the reference answer, after the model's own clean reasoning for think
    prompts: ``attacks.pgd_perturb``) accuracy of one model, with per-item records in
    ``run_dir`` keyed by the run's ``done.json`` and the settings (resumable, reread when cached).
    ``vlm_fn``: zero-argument function returning the model (called only if something is missing).
    Returns (clean results, PGD results) as ``evaluate`` DataFrames."""
    run_dir = Path(run_dir)
    done = run_dir / DONE_NAME
    if not done.is_file():
        raise FileNotFoundError(f"{done} does not exist: train the model first (ensure_sft / ensure_grpo)")
    ev = dict(prompt=mode, image_size=image_size, batch_size=batch_size, max_new_tokens=max_new_tokens)
    fp = _fingerprint({"model": done.read_text(), **ev, "eps": eps, "alpha": alpha, "steps": steps, "seed": seed},
                      items)
    cache: dict[str, Any] = {}

    def model():
        if "vlm" not in cache:
            cache["vlm"] = vlm_fn()
        return cache["vlm"]

    clean = _evaluate_cached(model, items, run_dir / f"eval-{fp}-clean.jsonl", **ev)
    outputs = dict(zip(clean["question_id"], clean["output"]))  # think targets: the clean reasoning

    def perturb(images, batch):  # built per batch, so a fully recorded run never loads the model
        return attacks.pgd_perturb(model(), prompt=mode, eps=eps, alpha=alpha, steps=steps, seed=seed,
                                   clean_outputs=outputs, max_new_tokens=max_new_tokens)(images, batch)

    pgd = _evaluate_cached(model, items, run_dir / f"eval-{fp}-pgd.jsonl", perturb=perturb, **ev)
    return clean, pgd


def robustness_summary(table, *, baseline: str, robust: str, max_clean_drop: float = 10.0, min_ratio: float = 2.0):
    """SafeMed-R1's targets from an "All" row of clean / PGD accuracies (%): ``robust``'s PGD
    accuracy at least ``min_ratio`` x ``baseline``'s, with at most ``max_clean_drop`` points of
    clean accuracy lost. ``table``: DataFrame indexed by model name with columns "clean", "PGD".
    Returns a one-row DataFrame with the measured numbers and whether each target is met."""
    import pandas as pd

    b, r = table.loc[baseline], table.loc[robust]
    ratio = r["PGD"] / b["PGD"] if b["PGD"] > 0 else float("inf") if r["PGD"] > 0 else float("nan")
    drop = b["clean"] - r["clean"]
    return pd.DataFrame([{
        "baseline": baseline, "robust": robust, "baseline clean": b["clean"], "baseline PGD": b["PGD"],
        "robust clean": r["clean"], "robust PGD": r["PGD"], "PGD ratio": ratio,
        f"PGD ratio >= {min_ratio:g}": bool(ratio >= min_ratio), "clean drop (points)": drop,
        f"clean drop <= {max_clean_drop:g}": bool(drop <= max_clean_drop)}])


def robustness_claims(overall, modes: Sequence[str], chance: float, *, detail: str = "") -> list[dict]:
    """SafeMed-R1's two robustness claims tested on notebook 05's "All" table, as keyword
    arguments for ``report.record_claim`` (claim_id, ours, holds, detail).

    ``overall``: DataFrame indexed by model name ("SFT-think", "AT-GRPO-nothink", ...) with "clean"
    and "PGD" accuracies (%); ``chance``: the chance accuracy (%); ``detail``: the attack, appended
    to each claim's detail. A model within 10 points of chance does not read the image, so a
    comparison involving one says nothing: its verdict is None ("cannot tell").
    - *AT-GRPO robust*: every AT-GRPO-<mode> is at least 10 points above SFT-<mode> under PGD;
    - *chain of thought more robust*: for SFT and for AT-GRPO, think beats nothink under PGD.
    """
    def informative(*names):
        return all(report.reads_image(overall.loc[n, "clean"], chance) for n in names)

    at = [m for m in modes if f"AT-GRPO-{m}" in overall.index and f"SFT-{m}" in overall.index]
    ours = "; ".join(f"AT-GRPO-{m} {overall.loc[f'AT-GRPO-{m}', 'clean']:.1f}% clean / "
                     f"{overall.loc[f'AT-GRPO-{m}', 'PGD']:.1f}% PGD vs SFT-{m} {overall.loc[f'SFT-{m}', 'clean']:.1f}% / "
                     f"{overall.loc[f'SFT-{m}', 'PGD']:.1f}%" for m in at)
    holds = (all(overall.loc[f"AT-GRPO-{m}", "PGD"] >= overall.loc[f"SFT-{m}", "PGD"] + MATERIAL_GAIN for m in at)
             if at and all(informative(f"AT-GRPO-{m}", f"SFT-{m}") for m in at) else None)
    claims = [dict(claim_id="safemed.atgrpo_robust", ours=ours, holds=holds,
                   detail=f"{detail}; holds = AT-GRPO at least {MATERIAL_GAIN:g} points above SFT under PGD; "
                          f"chance {chance:.1f}%")]
    pairs = [(f"{k}-think", f"{k}-nothink") for k in ("SFT", "AT-GRPO")
             if f"{k}-think" in overall.index and f"{k}-nothink" in overall.index]
    ours = "; ".join(f"{t.rsplit('-', 1)[0]}: think {overall.loc[t, 'PGD']:.1f}% vs nothink "
                     f"{overall.loc[n, 'PGD']:.1f}% under PGD" for t, n in pairs)
    holds = (all(overall.loc[t, "PGD"] > overall.loc[n, "PGD"] for t, n in pairs)
             if pairs and all(informative(t, n) for t, n in pairs) else None)
    claims.append(dict(claim_id="safemed.cot_more_robust", ours=ours or "no think/nothink pair on this profile",
                       holds=holds, detail=f"PGD accuracy, same attack; chance {chance:.1f}%"))
    return claims
