"""Supervised fine-tuning: one resumable loop that minimises the teacher-forced NLL of the targets.

The "standard fine-tuned" baseline of SafeMed-R1 and Med-R1's SFT: ``train_sft`` teaches the
completions of :mod:`safemed_lib.targets` (think: a rationale then the answer; nothink: the answer
alone) under a ``config.SFTRecipe``. Answer-only runs can add ``binding.binding_loss``'s auxiliary
terms (``recipe.binding``); adversarial runs (AT-SFT, Madry et al.) replace part of each batch by
PGD images against the current weights, noise-trained runs add Gaussian noise (:mod:`safemed_lib.sft_perturb`).

Why a plain loop and not TRL's ``SFTTrainer``: the loss every part of this project shares is
``VLM.sequence_nll`` (the same function PGD ascends), and the loop minimises exactly that: AdamW, a
cosine schedule with linear warm-up, gradient clipping, a CSV log and resumable checkpoints whose
optimizer/scheduler/RNG state is a plain tensor dict loaded with ``weights_only=True``.
``SFTTrainer`` would need its own dataset/collator path for Qwen2-VL images (not the differentiable
preprocessing the rest of the project uses) and pickled Trainer checkpoints.

Resuming: ``train_sft`` checkpoints every ``save_every`` steps and at the end into
``out_dir/ckpt-<step>`` and points to the newest one in ``out_dir/latest`` (written atomically).
Called again with the same settings it continues from that step; the data order is a pure
function of (seed, step), so an interrupted-and-resumed run takes the same batches as an
uninterrupted one. Models are cached by name through :mod:`safemed_lib.zoo`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from . import binding, data, models
from .records import atomic_write_text
from .sft_perturb import ADV_DEFAULTS, adversarial_images, adversarial_settings, noisy  # noqa: F401
from .targets import TARGET_FORMAT, VARIANTS, format_target, scenes_for, sft_targets, shuffle_options

LOG_FIELDS = ("step", "loss", "lr", "seconds")
RUN_FILE = "run.json"  # a finished run's settings, final model folder and seconds
BINDING_LOG_FIELDS = ("step", "match", "letter", "attention", "content", "scene", "pick")  # binding_log.csv


# --------------------------------------------------------------------------- one run's settings and files
WARMUP_FRAC = 0.05  # linear warm-up over this share of the steps, then cosine decay to 0
GRAD_CLIP = 1.0     # gradient-norm clipping


def run_settings(variant: str, train_items: Sequence[data.VQAItem], recipe, *, image_size, seed: int,
                 adversarial: dict | None = None, tag: dict | None = None) -> dict:
    """What identifies one SFT run (a checkpoint of other settings is never resumed): the variant,
    the recipe (``config.SFTRecipe``, its ``threads`` aside), the data, the seed and the options."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    aux = binding.settings(recipe.binding.model_dump() if recipe.binding is not None else None)
    if aux is not None and variant != "nothink":
        raise ValueError(f"binding supervises an answer-first completion; variant {variant!r} "
                         "starts with its reasoning (use it with variant='nothink')")
    ids = "\n".join(sorted(it.question_id for it in train_items))
    out = {"variant": variant, "steps": int(recipe.steps), "lr": float(recipe.lr), "batch_size": int(recipe.batch_size),
           "image_size": image_size, "seed": int(seed), "n_train": len(train_items), "shuffle_options": True,
           "target_format": TARGET_FORMAT, "train_ids_sha1": hashlib.sha1(ids.encode()).hexdigest(),
           "train_vision": bool(recipe.train_vision), "weight_decay": float(recipe.weight_decay),
           "binding_aux": aux, "adversarial": adversarial_settings(adversarial), "tag": tag}
    if recipe.noise_sigma:
        out["noise_sigma"] = float(recipe.noise_sigma)
    if recipe.format_only:
        if aux is not None:
            raise ValueError("format_only teaches no answer, and the binding terms supervise it (set binding: null)")
        out["format_only"] = True
    return out


def _same_run(a: dict, b: dict, ignore=("steps",)) -> list[str]:
    """Keys where two settings dicts differ (``steps`` may grow when a run is extended)."""
    return [k for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of 0-based ``step``'s batch: the concatenation of seeded per-epoch
    permutations, cut into consecutive batches. A pure function of its arguments, so resuming at
    any step takes exactly the batches an uninterrupted run would."""
    if n < 1:
        raise ValueError("no training items")
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch)[i])
    return out


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _read_state(out_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint directory and its state, or (None, None)."""
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None, None
    ckpt = out_dir / pointer.read_text().strip()
    state_file = ckpt / "state.pt"
    if not state_file.is_file():
        raise ValueError(f"{pointer} names {ckpt.name}, which has no state.pt; delete {out_dir} to restart")
    return ckpt, torch.load(state_file, map_location="cpu", weights_only=True)


def _write_checkpoint(out_dir: Path, vlm, state: dict, keep: frozenset = frozenset()) -> Path:
    """Save model + state into ``ckpt-<step>``, then move the ``latest`` pointer (atomically) and
    delete older checkpoints except those of the steps in ``keep``: a crash at any point leaves one
    complete checkpoint behind."""
    ckpt = out_dir / f"ckpt-{state['step']:06d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    vlm.save(ckpt / "model")
    torch.save(state, ckpt / "state.pt")
    atomic_write_text(out_dir / "latest", ckpt.name + "\n")
    for old in out_dir.glob("ckpt-*"):
        if old != ckpt and int(old.name.split("-")[1]) not in keep:
            shutil.rmtree(old)
    return ckpt


def _truncate_log(log: Path, step: int, fields=LOG_FIELDS) -> None:
    """Keep the log rows up to ``step`` (rows after the checkpoint are re-done on resume); start
    the file with its header if it does not exist."""
    rows = []
    if log.is_file():
        with open(log, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    atomic_write_text(log, ",".join(fields) + "\n" + "".join(
        ",".join(r[k] for k in fields) + "\n" for r in rows))


def read_log(out_dir: str | Path):
    """The training log ``out_dir/train_log.csv`` as a DataFrame (step, loss, lr, seconds)."""
    import pandas as pd

    return pd.read_csv(Path(out_dir) / "train_log.csv")


def read_run(out_dir: str | Path) -> dict | None:
    """A finished run's record (``out_dir/run.json``: its settings, the final model's folder, seconds)."""
    path = Path(out_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- the loop's parts
def _resume(vlm, out_dir: Path, settings: dict, steps: int):
    """(model, state): the newest checkpoint of the same run restored (weights reloaded), or ``vlm``
    and None for a fresh start."""
    ckpt, state = _read_state(out_dir)
    if state is None:
        return vlm, None
    diff = _same_run(state["settings"], settings)
    if diff:
        raise ValueError(f"{out_dir} holds a checkpoint of a different run (differs in {diff}); "
                         "use another out_dir or delete it")
    if state["step"] > steps:
        raise ValueError(f"{ckpt} is at step {state['step']} > steps={steps}; cannot train backwards")
    (out_dir / RUN_FILE).unlink(missing_ok=True)
    return models.load_vlm(ckpt / "model", device=vlm.device, image_size=vlm.image_size,
                           attn_implementation=vlm.model.config._attn_implementation), state


def _scenes(items: list, variant: str, aux: dict | None, format_only: bool = False) -> list:
    """The scene of every item where the targets or the scene term need one, else Nones."""
    if variant == "think" and not format_only:
        return scenes_for(items)
    if aux is not None and aux["scene"] > 0:
        return scenes_for(items, "binding's scene term needs the embedded benchmark's scene metadata "
                                 "(set its weight to 0 for other data)")
    return [None] * len(items)


def _binding_heads(vlm, aux: dict | None, scenes: list, seed: int, state: dict | None):
    """The auxiliary heads of the binding terms (None without them), restored on resume; the
    model's attention switches to the eager implementation (the attention term needs the weights)."""
    if aux is None:
        return None
    binding.check_model(vlm, aux)
    text = getattr(vlm.model.config, "text_config", vlm.model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = binding.BindingHeads(
            text.hidden_size, vocab_size=text.vocab_size if aux["content"] else None,
            scene_classes=binding.scene_classes(scenes) if aux["scene"] else None).to(vlm.device)
    if state is not None:
        heads.load_state_dict(state["binding_heads"])
    return heads


def _optimizer(params, recipe, state: dict | None):
    """AdamW with linear warm-up then cosine decay, restored on resume (with the torch RNG)."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(WARMUP_FRAC * recipe.steps)), recipe.steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    return optimizer, scheduler


def _batch(items: list, scenes: list, variant: str, batch_size: int, step: int, seed: int,
           format_only: bool = False):
    """0-based ``step``'s questions (each with a fresh option order seeded by (seed, step)), their
    targets (``targets.format_target``'s with ``format_only``) and their positions in ``items``."""
    idx = batch_indices(len(items), batch_size, step, seed)
    rng = random.Random(f"{seed}:{step}")
    batch = [shuffle_options(items[i], rng) for i in idx]
    targets = [format_target(it, variant, rng) if format_only else sft_targets(it, scenes[i], variant)
               for it, i in zip(batch, idx)]
    return batch, targets, idx


class _Logs:
    """``train_log.csv`` (mean SFT loss over each logged window) and, with binding terms,
    ``binding_log.csv`` (their parts); rows after ``step`` are dropped on resume."""

    def __init__(self, out_dir: Path, step: int, every: int, binding_terms: bool):
        self.path, self.every = out_dir / "train_log.csv", every
        self.aux_path = out_dir / "binding_log.csv" if binding_terms else None
        _truncate_log(self.path, step)
        if self.aux_path:
            _truncate_log(self.aux_path, step, BINDING_LOG_FIELDS)
        self.window: list[float] = []
        self.aux_window: list[dict] = []

    def add(self, step: int, last: bool, loss: float, parts: dict | None, lr: float, seconds: float) -> None:
        self.window.append(loss)
        if parts is not None:
            self.aux_window.append(parts)
        if step % self.every and not last:
            return
        with open(self.path, "a") as f:
            f.write(f"{step},{sum(self.window) / len(self.window):.6f},{lr:.6g},{seconds:.3f}\n")
        self.window = []
        if self.aux_path:
            with open(self.aux_path, "a") as f:
                f.write(f"{step}," + ",".join(f"{sum(p.get(k, 0.0) for p in self.aux_window) / len(self.aux_window):.6f}"
                                              for k in BINDING_LOG_FIELDS[1:]) + "\n")
            self.aux_window = []


# --------------------------------------------------------------------------- training
def train_sft(vlm, train_items: Sequence[data.VQAItem], recipe, *, variant: str, out_dir: str | Path,
              image_size: int | None = None, seed: int = 0, adversarial: dict | None = None,
              log_every: int = 10, save_every: int = 100, tag: dict | None = None,
              keep_steps: Sequence[int] = ()):
    """Fine-tune ``vlm`` on ``train_items`` with the targets ``sft_targets(item, scene, variant)``
    and the recipe ``recipe`` (``config.SFTRecipe``: steps, lr, batch size, weight decay, whether the
    vision tower trains, the binding terms); returns the trained VLM (a new object when weights were
    restored from a checkpoint).

    Minimises the mean per-token ``vlm.sequence_nll`` of the targets under the ``variant`` prompt
    (plus ``binding.binding_loss`` when the recipe has binding terms: their heads train along and
    are thrown away at the end) with AdamW, linear warm-up then cosine decay to 0, and gradient
    clipping, on float32 master weights (a bf16 model is upcast in place; bf16 autocast runs the
    compute on CUDA, :mod:`safemed_lib.models.precision`). Every item of every batch gets a fresh
    option order, seeded by (seed, step).
    ``adversarial`` (``adversarial_settings``): adversarial training (Madry et al.), each batch's
    first ``fraction`` of images replaced by PGD images against the current weights.
    ``recipe.noise_sigma``: Gaussian noise on every image (after the attack, if any), not clamped, as
    randomized smoothing draws it (Cohen et al.'s training of the base classifier).

    The run lives in ``out_dir``: ``train_log.csv`` every ``log_every`` steps (and ``binding_log.csv``),
    ``ckpt-<step>`` every ``save_every`` steps and at the end (model + optimizer, scheduler and RNG
    state, loaded with ``weights_only=True``) with an atomic ``latest`` pointer, and at the end
    ``run.json``. Called again on the same ``out_dir`` with the same settings it resumes from the
    newest checkpoint and takes exactly the batches an uninterrupted run would; with a larger
    ``recipe.steps`` after a finished run it continues (the schedule recomputed for the new total).
    ``tag``: extra JSON-able settings stored with the run (a checkpoint with another tag is not resumed).
    ``keep_steps``: steps whose checkpoints are kept (snapshots along one run; each is also saved then).
    """
    for name, v in (("log_every", log_every), ("save_every", save_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    items = list(train_items)
    if not items:
        raise ValueError("train_sft: no training items")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(variant, items, recipe, image_size=image_size, seed=seed, adversarial=adversarial,
                            tag=tag)
    aux, adv = settings["binding_aux"], settings["adversarial"]
    scenes = _scenes(items, variant, aux, recipe.format_only)
    vlm, state = _resume(vlm, out_dir, settings, recipe.steps)
    models.master_weights(vlm.model)  # fp32 master weights: bf16 would round most updates away
    step, seconds = (state["step"], state["seconds"]) if state else (0, 0.0)
    fixed = [] if recipe.train_vision else [p for p in models.vision_tower(vlm).parameters() if p.requires_grad]
    for p in fixed:
        p.requires_grad_(False)
    heads = _binding_heads(vlm, aux, scenes, seed, state)
    attn_impl = vlm.model.config._attn_implementation
    if heads is not None:
        vlm.model.set_attn_implementation("eager")  # the attention term needs the weights
    params = [p for p in vlm.model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
    optimizer, scheduler = _optimizer(params, recipe, state)
    logs = _Logs(out_dir, step, log_every, heads is not None)
    # A fixed vision tower gives every image the same embeddings at every step: compute each once.
    letters = vlm.letter_token_ids(5) if recipe.format_only else None  # a letter is taught, never which
    embed_cache = {} if not recipe.train_vision and adv is None and not recipe.noise_sigma else None
    vlm.model.train()
    while step < recipe.steps:
        t0 = time.perf_counter()
        batch, targets, idx = _batch(items, scenes, variant, recipe.batch_size, step, seed, recipe.format_only)
        images = (data.load_images(batch, size=image_size, cached=True) if embed_cache is None
                  else cached_image_embeds(vlm, batch, image_size, embed_cache))
        with models.autocast(vlm.device):  # bf16 compute on CUDA; a no-op on the CPU
            if adv is not None:  # the attack runs where the model is (its random start too)
                images = images.to(vlm.device)
                gen = torch.Generator(device=vlm.device).manual_seed(seed * 1_000_003 + step)
                images = adversarial_images(vlm, images, batch, targets, prompt=variant, adversarial=adv,
                                            generator=gen)
            if recipe.noise_sigma:  # Cohen et al.: the base classifier learns under the noise it is smoothed with
                gen = torch.Generator(device=vlm.device).manual_seed(seed * 1_000_033 + step)
                images = noisy(images.to(vlm.device), recipe.noise_sigma, gen)
            extras = {} if heads is not None else None
            uniform = [letters[:len(it.options)] for it in batch] if recipe.format_only else None
            loss = vlm.sequence_nll(images, batch, targets, prompt=variant, extras=extras, uniform_over=uniform).mean()
            total, parts = loss, None
            if heads is not None:
                aux_loss, parts = binding.binding_loss(vlm, heads, aux, extras, batch, variant,
                                                       scenes=[scenes[i] for i in idx] if aux["scene"] else None)
                total = loss + aux_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        seconds += time.perf_counter() - t0
        logs.add(step, step == recipe.steps, float(loss.detach()), parts, lr_now, seconds)
        if step % save_every == 0 or step == recipe.steps or step in keep_steps:
            state = {"step": step, "seconds": seconds, "settings": settings, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
            if heads is not None:
                state["binding_heads"] = heads.state_dict()
            _write_checkpoint(out_dir, vlm, state, frozenset(keep_steps))
    for p in fixed:
        p.requires_grad_(True)
    if heads is not None:
        vlm.model.set_attn_implementation(attn_impl)
    vlm.model.eval()
    ckpt, _ = _read_state(out_dir)
    atomic_write_text(out_dir / RUN_FILE, json.dumps(
        {**settings, "model": f"{ckpt.name}/model", "seconds": round(seconds, 3)}, indent=2) + "\n")
    return vlm


def cached_image_embeds(vlm, items: Sequence[data.VQAItem], image_size: int | None, cache: dict) -> models.ImageEmbeds:
    """``items``' images as the vision tower embeds them (``VLM.encode_images``, no gradient), each image
    loaded and embedded once: ``cache`` maps image paths to (embeds, grid). Only for a vision tower that
    does not change (SFT with ``train_vision=False``); bit for bit what the tower gives inside a batch."""
    new = [it for it in {it.image_path: it for it in items}.values() if it.image_path not in cache]
    if new:
        with torch.no_grad():
            e = vlm.encode_images(data.load_images(new, size=image_size))
        cache.update({it.image_path: (e.embeds[i], e.grid[i]) for i, it in enumerate(new)})
    return models.ImageEmbeds.stack([cache[it.image_path] for it in items])
