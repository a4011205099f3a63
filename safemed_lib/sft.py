"""Supervised fine-tuning: the "standard fine-tuned" baseline of SafeMed-R1 (and Med-R1's SFT).

Two variants that differ only in their training targets:

* ``think``:   ``<think> {rationale} </think>\\n<answer> C </answer>``, the rationale being the
  benchmark's chain of thought from ``synth.rationale`` (built from the image's generating
  parameters, ending in the evidence for the answer);
* ``nothink``: ``<answer> C </answer>``

(the canonical completions of ``prompts.format_completion``, which ``prompts.format_reward`` accepts).

``binding_aux`` (nothink only) adds ``binding.binding_loss``: auxiliary terms that supervise the
option binding a small answer-only model does not learn from the letter alone
(docs/tiny_model_learnability.md, fourteenth round).

Both start from the same untrained base (one tokenizer, one initialisation, cached under
``<models_dir>/base``), so any difference between them comes from the targets alone.

Why a plain loop and not TRL's ``SFTTrainer``: the loss every part of this project shares is
``VLM.sequence_nll`` (teacher-forced NLL of a completion given the image and the prompt, the same
function PGD ascends). The loop below minimises exactly that in ~40 readable lines: AdamW, a cosine
schedule with linear warm-up, gradient clipping, a CSV log and resumable checkpoints whose
optimizer/scheduler/RNG state is a plain tensor dict loaded with ``weights_only=True``.
``SFTTrainer`` would need its own dataset/collator path for Qwen2-VL images (not the differentiable
preprocessing the rest of the project uses) and pickled Trainer checkpoints.

Resuming: ``train_sft`` checkpoints every ``save_every`` steps and at the end into
``out_dir/ckpt-<step>`` (model via ``VLM.save``, state in ``state.pt``), and points to the newest one
in ``out_dir/latest`` (written atomically). Called again with the same settings it continues from
that step; the data order is a pure function of (seed, step), so an interrupted-and-resumed run
takes the same batches as an uninterrupted one. Calling it with a larger ``steps`` after a finished
run continues training (the cosine schedule is then recomputed for the new total).
"""
from __future__ import annotations

import csv
import dataclasses
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

from . import attacks, binding, data, models, pretrain, prompts, synth
from .records import atomic_write_text

VARIANTS = ("think", "nothink")
TARGET_FORMAT = 3  # bump when sft_targets changes: cached SFT models then retrain
LOG_FIELDS = ("step", "loss", "lr", "seconds")
BINDING_LOG_FIELDS = ("step", "match", "letter", "attention", "content", "scene", "pick")  # binding_log.csv


# --------------------------------------------------------------------------- targets
def sft_targets(item: data.VQAItem, scene: dict | None, variant: str) -> str:
    """The completion SFT teaches for ``item``, in the canonical form of
    ``prompts.format_completion`` (what ``prompts.format_reward`` accepts and what
    ``VLM.option_logprobs`` scores): ``variant="think"`` gives
    ``"<think> {rationale} </think>\\n<answer> C </answer>"`` with ``synth.rationale(item, scene)``;
    ``"nothink"`` gives ``"<answer> C </answer>"`` (``scene`` unused)."""
    if variant == "nothink":
        return prompts.format_completion(item.answer, "nothink")
    if variant == "think":
        if scene is None:
            raise ValueError(f"{item.question_id}: the think variant needs the image's scene metadata "
                             "(synth.load_scenes) to write a rationale; real OmniMedVQA has none, use "
                             "variant='nothink' there")
        return prompts.format_completion(item.answer, "think", think_rationale(item, scene))
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def think_rationale(item: data.VQAItem, scene: dict) -> str:
    """SFT-think's rationale: ``synth.rationale`` (the evidence, then the answer) followed by
    ``prompts.option_check`` (every option judged, in the prompt's order)."""
    return synth.rationale(item, scene) + " " + prompts.option_check(item.options, item.answer)


def shuffle_options(item: data.VQAItem, rng: random.Random) -> data.VQAItem:
    """A copy of ``item`` with its options in a random order and the answer letter moved along.

    SFT draws a fresh order for every item in every step (``train_sft(shuffle=True)``):
    the model cannot tie an answer to a letter or a position, only to the option's text."""
    options = list(item.options)
    right = options[prompts.LETTERS.index(item.answer)]
    order = list(range(len(options)))
    rng.shuffle(order)
    options = [options[i] for i in order]
    return dataclasses.replace(item, options=options, answer=prompts.LETTERS[options.index(right)])


def benchmark_root(item: data.VQAItem) -> Path | None:
    """The embedded benchmark root holding ``item``'s image (the folder with
    ``synth.SCENES_FILE`` above it), or None for data without scene metadata."""
    for parent in Path(item.image_path).resolve().parents:
        if (parent / synth.SCENES_FILE).is_file():
            return parent
    return None


def scenes_for(items: Sequence[data.VQAItem],
               need: str = "think-SFT rationales exist only for the embedded benchmark (use variant='nothink')",
               ) -> list[dict]:
    """Each item's scene (``synth.scene_of``); for items without one a clear error ending in ``need``."""
    cache: dict[Path, dict] = {}
    out = []
    for it in items:
        root = benchmark_root(it)
        if root is None:
            raise ValueError(f"{it.question_id}: no {synth.SCENES_FILE} above {it.image_path}; {need}")
        if root not in cache:
            cache[root] = synth.load_scenes(root)
        out.append(synth.scene_of(it, cache[root], root))
    return out


def sft_target_list(items: Sequence[data.VQAItem], variant: str) -> list[str]:
    """``sft_targets`` for every item (scenes looked up for the think variant)."""
    scenes = scenes_for(items) if variant == "think" else [None] * len(items)
    return [sft_targets(it, sc, variant) for it, sc in zip(items, scenes)]


# --------------------------------------------------------------------------- adversarial SFT
ADV_DEFAULTS = {"eps": 8 / 255, "alpha": None, "steps": 5, "fraction": 0.5, "norm": "linf"}


def adversarial_settings(adversarial: dict | None) -> dict | None:
    """``train_sft``'s ``adversarial`` argument checked and completed: None, or a dict with
    ``eps`` (radius in [0,1] pixel units), ``alpha`` (step; None: ``attacks.default_alpha``),
    ``steps`` (PGD steps), ``fraction`` (share of each batch attacked) and ``norm``."""
    if adversarial is None:
        return None
    if not isinstance(adversarial, dict):
        raise TypeError(f"adversarial must be None or a dict, got {type(adversarial).__name__}")
    unknown = set(adversarial) - set(ADV_DEFAULTS)
    if unknown:
        raise ValueError(f"adversarial: unknown keys {sorted(unknown)}; known: {sorted(ADV_DEFAULTS)}")
    adv = {**ADV_DEFAULTS, **adversarial}
    if adv["norm"] not in attacks.NORMS:
        raise ValueError(f"adversarial.norm must be one of {attacks.NORMS}, got {adv['norm']!r}")
    if not adv["eps"] > 0:
        raise ValueError(f"adversarial.eps must be > 0, got {adv['eps']!r}")
    if int(adv["steps"]) != adv["steps"] or adv["steps"] < 1:
        raise ValueError(f"adversarial.steps must be an integer >= 1, got {adv['steps']!r}")
    if not 0 < adv["fraction"] <= 1:
        raise ValueError(f"adversarial.fraction must be in (0, 1], got {adv['fraction']!r}")
    if adv["alpha"] is None:
        adv["alpha"] = attacks.default_alpha(adv["eps"], int(adv["steps"]))
    if not adv["alpha"] > 0:
        raise ValueError(f"adversarial.alpha must be > 0, got {adv['alpha']!r}")
    return {"eps": float(adv["eps"]), "alpha": float(adv["alpha"]), "steps": int(adv["steps"]),
            "fraction": float(adv["fraction"]), "norm": adv["norm"]}


def adversarial_images(vlm, images: torch.Tensor, items: Sequence[data.VQAItem], targets: Sequence[str], *,
                       prompt: str, adversarial: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Madry et al.'s inner maximisation for one SFT batch: the first ``round(fraction * B)``
    images replaced by PGD images that ascend the batch's own SFT loss (``vlm.sequence_nll`` of
    its targets, the loss the step then descends), put on the 8-bit grid inside the ball. The
    model is in eval mode during the attack. Returns a new batch; ``images`` is not modified."""
    adv = adversarial_settings(adversarial)
    k = round(adv["fraction"] * len(items))
    if k == 0:
        return images
    items, targets = list(items)[:k], list(targets)[:k]
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        x_adv = attacks.pgd(lambda z: vlm.sequence_nll(z, items, targets, prompt=prompt), images[:k],
                            eps=adv["eps"], alpha=adv["alpha"], steps=adv["steps"], norm=adv["norm"],
                            generator=generator)
    finally:
        vlm.model.train(was_training)
    return torch.cat([attacks.round_8bit_toward(x_adv, images[:k]), images[k:]])


# --------------------------------------------------------------------------- training
def _settings(variant, train_items, *, steps, lr, batch_size, image_size, seed, shuffle=True,
              adversarial=None, train_vision=True, binding_aux=None, weight_decay=0.0) -> dict:
    ids = "\n".join(sorted(it.question_id for it in train_items))
    extra = {} if adversarial is None else {"adversarial": adversarial_settings(adversarial)}
    if not train_vision:
        extra["train_vision"] = False
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if weight_decay:  # recorded only when set, so runs without it keep their cache keys
        extra["weight_decay"] = float(weight_decay)
    aux = binding.settings(binding_aux)
    if aux is not None:
        if variant != "nothink":
            raise ValueError(f"binding_aux supervises an answer-first completion; variant {variant!r} "
                             "starts with its reasoning (use it with variant='nothink')")
        extra["binding_aux"] = aux
    return {"variant": variant, "steps": int(steps), "lr": float(lr), "batch_size": int(batch_size),
            "image_size": image_size, "seed": int(seed), "n_train": len(train_items),
            "shuffle_options": bool(shuffle), "target_format": TARGET_FORMAT,
            "train_ids_sha1": hashlib.sha1(ids.encode()).hexdigest(), **extra}


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


def _write_checkpoint(out_dir: Path, vlm, state: dict) -> Path:
    """Save model + state into ``ckpt-<step>``, then move the ``latest`` pointer (atomically) and
    delete older checkpoints: a crash at any point leaves one complete checkpoint behind."""
    ckpt = out_dir / f"ckpt-{state['step']:06d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    vlm.save(ckpt / "model")
    torch.save(state, ckpt / "state.pt")
    atomic_write_text(out_dir / "latest", ckpt.name + "\n")
    for old in out_dir.glob("ckpt-*"):
        if old != ckpt:
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


def train_sft(vlm, train_items: Sequence[data.VQAItem], *, variant: str, steps: int, lr: float,
              batch_size: int, image_size: int | None, out_dir: str | Path, seed: int = 0,
              log_every: int = 10, save_every: int = 100, warmup_frac: float = 0.05,
              weight_decay: float = 0.0, grad_clip: float = 1.0, shuffle: bool = True, tag: dict | None = None,
              adversarial: dict | None = None, train_vision: bool = True, binding_aux: dict | bool | None = None):
    """Fine-tune ``vlm`` on ``train_items`` with targets ``sft_targets(item, scene, variant)``.

    Minimises the mean per-token ``vlm.sequence_nll`` of the targets under the ``variant`` prompt,
    with AdamW, linear warm-up over ``warmup_frac`` of the steps then cosine decay to 0, and
    gradient-norm clipping at ``grad_clip``. Logs every ``log_every`` steps (and the last) to
    ``out_dir/train_log.csv`` (step, loss = mean over the logged window, lr, seconds of training
    so far) and checkpoints every ``save_every`` steps and at the end. With ``shuffle`` (the default)
    every item of every batch gets a fresh option order (``shuffle_options``, seeded by
    (seed, step), so a resumed run sees the same batches). If ``out_dir`` holds a
    checkpoint of the same run (same variant, lr, batch, image size, seed and training items), training
    resumes from it: weights via ``models.load_vlm``, optimizer, scheduler and RNG state from
    ``state.pt``. A finished run writes ``out_dir/done.json``. ``tag``: extra JSON-able settings
    (e.g. which base model) stored with the run; a checkpoint with another tag is not resumed.
    ``adversarial``: None (standard SFT) or a dict for ``adversarial_settings`` (eps, alpha, steps,
    fraction, norm): adversarial training (Madry et al.), every batch's first ``fraction`` of
    images replaced by PGD images against the current weights (``adversarial_images``; the random
    start seeded by (seed, step), so a resumed run attacks as an uninterrupted one).
    ``train_vision=False`` keeps the vision tower (and its merger) fixed: only the language model
    learns (the tiny profile's setting, which keeps what its vision pretraining taught the tokens).
    ``weight_decay``: AdamW's decoupled weight decay on every trained parameter (the binding heads too);
    part of the run's settings when not 0.
    ``binding_aux``: None, True or a dict for ``binding.settings`` (nothink only): adds
    ``binding.binding_loss`` (option match, option letter, and the last layer's attention from the
    answer position to the right option; with weights for them, the content and scene terms at that
    position, the scene term from the training items' scenes) to the SFT loss; its heads are
    trained along, kept in the checkpoints' state for resuming and thrown away at the end. The parts are logged to
    ``out_dir/binding_log.csv``; ``loss`` in ``train_log.csv`` stays the SFT loss alone.

    Returns the trained VLM (a new object when weights were restored from a checkpoint).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                    ("save_every", save_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    train_items = list(train_items)
    if not train_items:
        raise ValueError("train_sft: no training items")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(variant, train_items, steps=steps, lr=lr, batch_size=batch_size,
                         image_size=image_size, seed=seed, shuffle=shuffle, adversarial=adversarial,
                         train_vision=train_vision, binding_aux=binding_aux, weight_decay=weight_decay)
    settings["tag"] = tag
    aux = settings.get("binding_aux")
    if aux is not None:
        binding.check_model(vlm, aux)
    if variant == "think":
        scenes = scenes_for(train_items)
    elif aux is not None and aux["scene"] > 0:
        scenes = scenes_for(train_items, "binding_aux['scene'] needs the embedded benchmark's scene metadata "
                                         "(set its weight to 0 for other data)")
    else:
        scenes = [None] * len(train_items)

    ckpt, state = _read_state(out_dir)
    if state is not None:
        diff = _same_run(state["settings"], settings)
        if diff:
            raise ValueError(f"{out_dir} holds a checkpoint of a different run (differs in {diff}); "
                             "use another out_dir or delete it")
        if state["step"] > steps:
            raise ValueError(f"{ckpt} is at step {state['step']} > steps={steps}; cannot train backwards")
        vlm = models.load_vlm(ckpt / "model", device=vlm.device, image_size=vlm.image_size)
        (out_dir / "done.json").unlink(missing_ok=True)
    step = state["step"] if state else 0
    seconds = state["seconds"] if state else 0.0

    fixed = [] if train_vision else [p for p in models.vision_tower(vlm).parameters() if p.requires_grad]
    for p in fixed:
        p.requires_grad_(False)
    heads = None
    if aux is not None:
        text = getattr(vlm.model.config, "text_config", vlm.model.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = binding.BindingHeads(
                text.hidden_size, vocab_size=text.vocab_size if aux["content"] else None,
                scene_classes=binding.scene_classes(scenes) if aux["scene"] else None).to(vlm.device)
        if state is not None:
            heads.load_state_dict(state["binding_heads"])
        attn_impl = vlm.model.config._attn_implementation
        vlm.model.set_attn_implementation("eager")  # the attention term needs the weights
    params = [p for p in vlm.model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(warmup_frac * steps)), steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    log = out_dir / "train_log.csv"
    _truncate_log(log, step)
    if heads is not None:
        _truncate_log(out_dir / "binding_log.csv", step, BINDING_LOG_FIELDS)

    # A fixed vision tower gives every image the same embeddings at every step: compute each once.
    embed_cache = {} if not train_vision and adversarial is None else None
    vlm.model.train()
    window: list[float] = []
    aux_window: list[dict] = []
    while step < steps:
        t0 = time.perf_counter()
        idx = batch_indices(len(train_items), batch_size, step, seed)
        batch = [train_items[i] for i in idx]
        if shuffle:
            rng = random.Random(f"{seed}:{step}")
            batch = [shuffle_options(it, rng) for it in batch]
        targets = [sft_targets(it, scenes[i], variant) for it, i in zip(batch, idx)]
        images = (data.load_images(batch, size=image_size) if embed_cache is None
                  else cached_image_embeds(vlm, batch, image_size, embed_cache))
        if adversarial is not None:  # the attack runs where the model is (its random start too)
            images = images.to(vlm.device)
            gen = torch.Generator(device=vlm.device).manual_seed(seed * 1_000_003 + step)
            images = adversarial_images(vlm, images, batch, targets, prompt=variant,
                                        adversarial=settings["adversarial"], generator=gen)
        extras = {} if heads is not None else None
        loss = vlm.sequence_nll(images, batch, targets, prompt=variant, extras=extras).mean()
        total = loss
        if heads is not None:
            aux_loss, parts = binding.binding_loss(vlm, heads, aux, extras, batch, variant,
                                                   scenes=[scenes[i] for i in idx] if aux["scene"] else None)
            total = loss + aux_loss
            aux_window.append(parts)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        seconds += time.perf_counter() - t0
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            with open(log, "a") as f:
                f.write(f"{step},{sum(window) / len(window):.6f},{lr_now:.6g},{seconds:.3f}\n")
            window = []
            if heads is not None:
                with open(out_dir / "binding_log.csv", "a") as f:
                    f.write(f"{step}," + ",".join(f"{sum(p.get(k, 0.0) for p in aux_window) / len(aux_window):.6f}"
                                                  for k in BINDING_LOG_FIELDS[1:]) + "\n")
                aux_window = []
        if step % save_every == 0 or step == steps:
            state = {"step": step, "seconds": seconds, "settings": settings,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            if heads is not None:
                state["binding_heads"] = heads.state_dict()
            ckpt = _write_checkpoint(out_dir, vlm, state)
    for p in fixed:
        p.requires_grad_(True)
    if heads is not None:
        vlm.model.set_attn_implementation(attn_impl)
    vlm.model.eval()
    atomic_write_text(out_dir / "done.json", json.dumps(
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


# --------------------------------------------------------------------------- cached models
BASE_COPY_STEPS = 400  # pretrain.copy_pretrain steps of the tiny base (0: none)
BASE_VISION_STEPS = 2000  # pretrain.vision_pretrain steps of the tiny base (0: none; embedded benchmark only)
BASE_POSITION_WEIGHT = 1.0  # its per-token row/column loss (docs/tiny_model_learnability.md, tenth round)
# Vision pretraining also sees images of its own: a second generated set, this many times the benchmark's image
# count, from another seed (never the benchmark's images, questions or answers; 0: none). 3x lifted SFT-think by
# 4.8 and 6.4 points for seeds 0 and 1 (docs/tiny_model_learnability.md, twelfth round).
BASE_PRETRAIN_IMAGES = 3
PRETRAIN_SEED_OFFSET = 7  # the extra set's seed is the benchmark's seed + this (the measured setting)
TINY_MODEL = dict(hidden_size=128, layers=2)  # build_tiny_vlm arguments of the embedded default


def corpus_texts(items: Sequence[data.VQAItem]) -> list[str]:
    """The texts the tiny model's tokenizer is trained on: each item's problem (question and
    options, as the prompt shows them) and, on the embedded benchmark, its think rationale."""
    texts = [prompts.format_problem(it) for it in items]
    if items and benchmark_root(items[0]) is not None:
        texts += [think_rationale(it, sc) for it, sc in zip(items, scenes_for(items))]
    return texts


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _base_plan(corpus_items, image_size, seed, model_kwargs, copy_steps=None,
               vision_steps=None) -> tuple[list[str], dict, dict]:
    """(tokenizer corpus, build_tiny_vlm kwargs, metadata that identifies the tiny base).
    Vision pretraining needs the embedded benchmark's scenes: without them its steps are 0."""
    corpus_items = list(corpus_items)
    kwargs = {**TINY_MODEL, **(model_kwargs or {}), "image_size": image_size}
    corpus = corpus_texts(corpus_items)
    steps = BASE_COPY_STEPS if copy_steps is None else int(copy_steps)
    vsteps = BASE_VISION_STEPS if vision_steps is None else int(vision_steps)
    if not corpus_items or benchmark_root(corpus_items[0]) is None:
        vsteps = 0
    meta = {"seed": seed, "model_kwargs": kwargs, "corpus_sha1": _fingerprint(corpus),
            "copy_steps": steps, "vision_steps": vsteps}
    if vsteps:
        meta["vision_recipe"] = {"heads": "mean: scene attributes; attention pool: lesion quadrants",
                                 "position_weight": BASE_POSITION_WEIGHT}
        bench = synth.read_stamp(benchmark_root(corpus_items[0]))
        if BASE_PRETRAIN_IMAGES and bench:
            meta["pretrain_images"] = {"n_images": BASE_PRETRAIN_IMAGES * bench["n_images"],
                                       "seed": bench["seed"] + PRETRAIN_SEED_OFFSET, "size": bench["size"]}
    return corpus, kwargs, meta


def pretrain_images(models_dir: Path, spec: dict) -> list[data.VQAItem]:
    """The vision pretraining's own images (``_base_plan``'s ``pretrain_images``): a generated set under
    ``<models_dir>/pretrain_images``, made once; only their images and scenes are used."""
    root = synth.ensure_benchmark(models_dir / "pretrain_images", n_images=spec["n_images"], seed=spec["seed"],
                                  size=spec["size"])
    return list(data.load_omnimedvqa(root, strict=True))


def _vision_pretrain_base(vlm, corpus_items, steps: int, image_size: int, seed: int) -> list[dict]:
    """``pretrain.vision_pretrain`` on the distinct images of ``corpus_items`` (the training split, and
    ``pretrain_images`` when the plan has them) with their scenes' labels and lesion quadrants, and the
    per-token position loss."""
    first = {}
    for it in corpus_items:
        first.setdefault(str(it.image_path), it)
    items = [first[k] for k in sorted(first)]
    scenes = scenes_for(items)
    labels = [pretrain.scene_labels(sc) for sc in scenes]
    where = torch.tensor([pretrain.scene_quadrants(sc) for sc in scenes])
    return pretrain.vision_pretrain(vlm, data.load_images(items, size=image_size), labels, steps, seed=seed,
                                    where=where, position_weight=BASE_POSITION_WEIGHT)


def ensure_base(models_dir: str | Path, corpus_items: Sequence[data.VQAItem], *, image_size: int,
                seed: int = 0, model_path: str | Path | None = None, model_kwargs: dict | None = None,
                device=None, copy_steps: int | None = None, vision_steps: int | None = None):
    """The starting point both SFT variants share (never trained on the benchmark's questions).

    With ``model_path`` (paper profile): that local Qwen2-VL / Qwen2.5-VL checkpoint, loaded with
    ``models.load_vlm``. Otherwise the tiny model, built once by ``models.build_tiny_vlm`` (tokenizer
    trained on ``corpus_texts(corpus_items)``; ``model_kwargs`` default ``TINY_MODEL``), given
    in-context copying by ``pretrain.copy_pretrain`` for ``copy_steps`` steps (default
    ``BASE_COPY_STEPS``; random token sequences, no benchmark data), its vision tower pretrained
    by ``pretrain.vision_pretrain`` for ``vision_steps`` steps (default ``BASE_VISION_STEPS``) on
    the images of ``corpus_items``, plus ``BASE_PRETRAIN_IMAGES`` times the benchmark's count of
    generated images of its own (``pretrain_images``), and their scenes' labels (embedded benchmark
    only; never a test image, a question or an answer), and cached in ``<models_dir>/base`` with
    both logs (rebuilt if its settings differ). Always returns a fresh copy from disk.
    """
    from .paths import resolve

    if model_path:
        return models.load_vlm(resolve(model_path), device=device, image_size=image_size)
    corpus, kwargs, meta = _base_plan(corpus_items, image_size, seed, model_kwargs, copy_steps, vision_steps)
    base_dir = resolve(models_dir) / "base"
    if _read_json(base_dir / "done.json") != meta:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        vlm = models.build_tiny_vlm(corpus, seed=seed, **kwargs)
        base_dir.mkdir(parents=True, exist_ok=True)
        if meta["copy_steps"]:
            log = pretrain.copy_pretrain(vlm, meta["copy_steps"], seed=seed)
            atomic_write_text(base_dir / "copy_log.json", json.dumps(log, indent=1) + "\n")
        if meta["vision_steps"]:
            extra = pretrain_images(resolve(models_dir), meta["pretrain_images"]) if "pretrain_images" in meta else []
            log = _vision_pretrain_base(vlm, list(corpus_items) + extra, meta["vision_steps"], image_size, seed)
            atomic_write_text(base_dir / "vision_log.json", json.dumps(log, indent=1) + "\n")
        vlm.model.eval()
        vlm.save(base_dir / "model")
        atomic_write_text(base_dir / "done.json", json.dumps(meta, indent=2) + "\n")
    return models.load_vlm(base_dir / "model", device=device)


def base_id(models_dir: str | Path, model_path: str | Path | None = None) -> str:
    """A short id of the base ``ensure_base`` returns (the SFT caches record it): ``model_path``
    itself, or a fingerprint of the cached tiny base's settings and tokenizer corpus."""
    from .paths import resolve

    if model_path:
        return str(resolve(model_path))
    return _fingerprint(_read_json(resolve(models_dir) / "base" / "done.json"))


def ensure_sft(models_dir: str | Path, variant: str, train_items: Sequence[data.VQAItem], *,
               image_size: int, steps: int, lr: float, batch_size: int, seed: int = 0,
               corpus_items: Sequence[data.VQAItem] | None = None, model_path: str | Path | None = None,
               model_kwargs: dict | None = None, log_every: int = 10, save_every: int = 100, device=None,
               train_vision: bool = True, binding_aux: dict | bool | None = None, train_threads: int | None = None,
               weight_decay: float = 0.0):
    """The SFT model of ``variant``, trained once and cached in ``<models_dir>/sft-<variant>``
    (``train_vision``, ``binding_aux``, ``weight_decay``: see ``train_sft``).

    ``train_threads``: torch threads while this call trains (None: the process's setting, restored
    afterwards). It changes the speed and the last bits of the weights, not the recipe, so it is not
    part of the cache key: a finished run trained with other threads is loaded.

    If ``done.json`` there records the same settings and the same base (the tiny base's settings
    and tokenizer corpus, or ``model_path``), the model is loaded; a matching unfinished run is
    resumed; anything else is deleted and trained afresh from
    ``ensure_base(models_dir, corpus_items or train_items, ...)``.
    """
    from .paths import resolve

    train_items = list(train_items)
    corpus_items = corpus_items if corpus_items is not None else train_items
    base = str(resolve(model_path)) if model_path else \
        _fingerprint(_base_plan(corpus_items, image_size, seed, model_kwargs)[2])
    out_dir = resolve(models_dir) / f"sft-{variant}"
    settings = {**_settings(variant, train_items, steps=steps, lr=lr, batch_size=batch_size,
                            image_size=image_size, seed=seed, train_vision=train_vision, binding_aux=binding_aux,
                            weight_decay=weight_decay),
                "tag": {"base": base}}
    start = lambda: ensure_base(models_dir, corpus_items, image_size=image_size, seed=seed,  # noqa: E731
                                model_path=model_path, model_kwargs=model_kwargs, device=device)
    if train_threads is not None and (int(train_threads) != train_threads or train_threads < 1):
        raise ValueError(f"train_threads must be an integer >= 1 or None, got {train_threads!r}")
    before = torch.get_num_threads()
    try:
        if train_threads is not None:
            torch.set_num_threads(int(train_threads))
        return _cached_run(out_dir, settings, start, train_items, variant=variant, steps=steps, lr=lr,
                           batch_size=batch_size, image_size=image_size, seed=seed, log_every=log_every,
                           save_every=save_every, device=device, train_vision=train_vision, binding_aux=binding_aux,
                           weight_decay=weight_decay)
    finally:
        torch.set_num_threads(before)


def _cached_run(out_dir: Path, settings: dict, start, train_items, *, device=None, adversarial=None, **train_kwargs):
    """The finished run in ``out_dir`` if its ``done.json`` records ``settings``; else the matching
    unfinished run resumed, or (anything else deleted) ``train_sft`` from ``start()``."""
    done = _read_json(out_dir / "done.json")
    if done is not None and all(done.get(k) == v for k, v in settings.items()):
        return models.load_vlm(out_dir / done["model"], device=device)
    _, state = _read_state(out_dir) if (out_dir / "latest").is_file() else (None, None)
    if out_dir.exists() and (state is None or _same_run(state["settings"], settings)
                             or state["step"] > train_kwargs["steps"]):
        shutil.rmtree(out_dir)  # a stale cache of other settings
    return train_sft(start(), train_items, out_dir=out_dir, tag=settings["tag"], adversarial=adversarial,
                     **train_kwargs)


def ensure_adversarial_sft(models_dir: str | Path, variant: str, train_items: Sequence[data.VQAItem], *,
                           start, start_id: str, adversarial: dict, image_size: int, steps: int, lr: float,
                           batch_size: int, seed: int = 0, name: str | None = None, log_every: int = 10,
                           save_every: int = 100, device=None):
    """Adversarial fine-tuning (Madry et al.'s PGD adversarial training on the SFT loss) from a
    trained model, cached in ``<models_dir>/<name>`` (default ``sftat-<variant>``): the classical
    defence beside AT-GRPO, from the same starting point and with supervised targets instead of
    rewards. ``start``: zero-argument function returning the starting VLM (called only when
    training is needed); ``start_id``: a string naming it (e.g. its ``done.json``), stored with the
    run so that another start retrains. ``adversarial``: see ``adversarial_settings``. Resumable,
    like ``ensure_sft``."""
    from .paths import resolve

    train_items = list(train_items)
    out_dir = resolve(models_dir) / (name or f"sftat-{variant}")
    settings = {**_settings(variant, train_items, steps=steps, lr=lr, batch_size=batch_size, image_size=image_size,
                            seed=seed, adversarial=adversarial), "tag": {"start": start_id}}
    return _cached_run(out_dir, settings, start, train_items, variant=variant, steps=steps, lr=lr,
                       batch_size=batch_size, image_size=image_size, seed=seed, log_every=log_every,
                       save_every=save_every, device=device, adversarial=adversarial)


def variant_kwargs(variant: str, *, steps: int, nothink_steps: int | None = None,
                   nothink_binding_aux: dict | bool | None = None, nothink_threads: int | None = None,
                   nothink_weight_decay: float | None = None, **kwargs) -> dict:
    """``ensure_sft``'s keyword arguments for ``variant`` from a profile's ``sft_*`` parameters:
    the nothink variant trains ``nothink_steps`` steps (None: ``steps``) with
    ``nothink_binding_aux`` and AdamW's ``nothink_weight_decay`` (None: 0), on ``nothink_threads``
    torch threads (None: the process's); the think variant trains ``steps`` steps with none of them.
    Every notebook that loads an SFT model goes through this, so they all name the same cached run."""
    if variant == "nothink":
        return {**kwargs, "steps": steps if nothink_steps is None else nothink_steps,
                "binding_aux": nothink_binding_aux, "train_threads": nothink_threads,
                "weight_decay": nothink_weight_decay or 0.0}
    return {**kwargs, "steps": steps}


def ensure_sft_variants(models_dir: str | Path, variants: Sequence[str], train_items: Sequence[data.VQAItem], *,
                        workers: int = 1, threads: int = 1, **kwargs) -> dict:
    """``ensure_sft`` for each of ``variants``; returns {variant: VLM}.

    With ``workers > 1``, ``ensure_sft`` runs for up to ``workers`` variants at a time, each in
    its own process with ``threads`` torch threads (on the 2-core default machine the two tiny
    variants then train in the time of one; cached ones are only loaded). The shared base is
    built first, in this process, so both start from the same weights; each run is the same
    computation as in this process, and it checkpoints and resumes the same way. ``kwargs`` go
    through ``variant_kwargs`` (``nothink_steps``, ``nothink_binding_aux``, ``nothink_threads``,
    ``nothink_weight_decay``) to
    ``ensure_sft``; use ``workers=1`` for GPU runs (one device), and for runs that use more than
    one thread each (the tiny profile's nothink run takes both cores after the think run)."""
    from .workbook import background

    variants = list(variants)
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    train_items = list(train_items)
    if workers > 1 and len(variants) > 1:
        corpus = kwargs.get("corpus_items") or train_items
        ensure_base(models_dir, corpus, image_size=kwargs["image_size"], seed=kwargs.get("seed", 0),
                    model_path=kwargs.get("model_path"), model_kwargs=kwargs.get("model_kwargs"))
        for i in range(0, len(variants), workers):
            jobs = [background(ensure_sft, models_dir, v, train_items, threads=threads, **variant_kwargs(v, **kwargs))
                    for v in variants[i:i + workers]]
            for job in jobs:
                job.result()  # re-raises a worker's error here
    return {v: ensure_sft(models_dir, v, train_items, **variant_kwargs(v, **kwargs)) for v in variants}
