"""What a real VLM brings from pretraining, given to the tiny base: in-context copying and a
vision tower whose features say what the image shows.

A Qwen2-VL checkpoint arrives able to copy from its context (induction heads: having seen
``... x y ...``, on meeting ``x`` again predict ``y``). The tiny model is trained from scratch, and
without that ability it never learns the multiple-choice step of copying an option from the prompt
(docs/tiny_model_learnability.md: SFT alone stays at chance). :func:`copy_pretrain` gives it the
ability the way it arises in language models, on text that repeats itself: random token sequences
shown twice, the loss on the second copy. No benchmark text, image or answer is involved; on the
tiny model the copy accuracy goes from 0 to 1 within about 200 steps; the base takes 400 (about 30 s on one core).

Qwen2-VL's vision encoder arrives pretrained on image-text pairs (its first training stage). The tiny
model's does not, and trained only through the language model's SFT loss it learns the image poorly
(docs/tiny_model_learnability.md, eighth round). :func:`vision_pretrain` is the tiny stand-in for that
stage: a linear head per scene attribute (:data:`SCENE_ATTRIBUTES`, the image's "caption") on the
mean of the vision tower's merged tokens, trained on the training split's images; the heads are then
thrown away. It never sees a question, an option or an answer letter.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import get_cosine_schedule_with_warmup


def copy_batch(vocab_size: int, batch_size: int, half_len: int, generator: torch.Generator,
               low: int = 16) -> torch.Tensor:
    """(batch, 2*half_len) token ids: random ids in [low, vocab_size), each row twice in a row.
    ``low`` keeps the special tokens (the first ids of the tiny tokenizer) out."""
    if not 0 <= low < vocab_size - 1:
        raise ValueError(f"low={low} leaves no tokens below vocab_size={vocab_size}")
    half = torch.randint(low, vocab_size, (batch_size, half_len), generator=generator)
    return torch.cat([half, half], 1)


def copy_pretrain(vlm, steps: int = 250, *, seed: int = 0, batch_size: int = 32, half_len: int = 24,
                  lr: float = 1e-3) -> list[dict]:
    """Train ``vlm``'s language model in place to copy: next-token loss on the second half of
    :func:`copy_batch` rows (text only, no image). AdamW, 20 warm-up steps, cosine decay, gradient
    clipping at 1. Deterministic for a ``seed`` (the caller's RNG is untouched). Returns a log row
    (step, loss, copy accuracy) every 50 steps and at the end."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    model = vlm.model
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, min(20, steps), steps)
    was_training = model.training
    model.train()
    log = []
    for step in range(1, steps + 1):
        ids = copy_batch(vocab, batch_size, half_len, g).to(vlm.device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, half_len:-1].float()
        target = ids[:, half_len + 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            acc = (logits.argmax(-1) == target).float().mean().item()
            log.append({"step": step, "loss": round(loss.item(), 4), "copy_accuracy": round(acc, 4)})
    model.train(was_training)
    return log


# ----------------------------------------------------------------------------- vision tower
SCENE_ATTRIBUTES = ("modality", "anatomy", "finding", "grade", "count", "quadrant", "style")


def scene_labels(scene: dict) -> dict[str, str]:
    """The caption :func:`vision_pretrain` predicts for one embedded-benchmark scene
    (``synth.load_scenes`` values): each of :data:`SCENE_ATTRIBUTES` as a string, "none" where the
    scene has no such attribute (no anatomy for a dermoscopy image, no style for an MRI), the
    quadrant being the first lesion's. A scene without a modality or a lesion list is an error."""
    missing = [k for k in ("modality", "lesions") if k not in scene]
    if missing:
        raise ValueError(f"scene {scene.get('image', '?')}: missing {missing}")
    labels = {a: "none" if scene.get(a) is None else str(scene[a]) for a in SCENE_ATTRIBUTES if a != "quadrant"}
    labels["quadrant"] = scene["lesions"][0]["quadrant"] if scene["lesions"] else "none"
    return labels


def image_tokens(vlm, images: torch.Tensor) -> torch.Tensor:
    """(B, tokens, hidden): the merged visual tokens the language model receives for ``images``
    ((B,3,H,W) in [0,1], one on-grid size)."""
    pixel_values, grid = vlm.preprocess(images.to(vlm.device))
    out = vlm.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.reshape(images.shape[0], -1, out.shape[-1])


def vision_pretrain(vlm, images: torch.Tensor, labels: Sequence[dict[str, str]], steps: int, *, seed: int = 0,
                    batch_size: int = 32, lr: float = 2e-3) -> list[dict]:
    """Train ``vlm``'s vision tower (and its merger) in place to say what each image shows.

    ``images``: (N,3,H,W) in [0,1]; ``labels``: N dicts with the same keys (e.g.
    :func:`scene_labels`), string values. One linear head per key reads the mean of the image's
    merged tokens (the language model attends over those tokens, so what the heads need must be
    readable from their average); the summed cross-entropy trains tower and heads with AdamW at a
    constant ``lr``, without clipping (the setting docs/tiny_model_learnability.md measured). The
    heads are discarded. Deterministic for a ``seed`` (the caller's RNG is untouched). Returns a
    log row (step, loss, accuracy: the share of the batch's labels right) every 100 steps and at
    the end."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if len(labels) != len(images) or not len(images):
        raise ValueError(f"vision_pretrain: {len(images)} images but {len(labels)} label rows")
    keys = sorted(labels[0])
    if any(sorted(row) != keys for row in labels):
        raise ValueError(f"vision_pretrain: every label row needs the keys {keys}")
    classes = {k: sorted({row[k] for row in labels}) for k in keys}
    y = torch.tensor([[classes[k].index(row[k]) for k in keys] for row in labels])
    model = vlm.model
    tower = model.model.visual
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = image_tokens(vlm, images[:1]).shape[-1]
        heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(classes[k])) for k in keys).to(vlm.device)
        params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        model.train()
        log = []
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(images), (batch_size,), generator=g)
            pooled = image_tokens(vlm, images[idx]).mean(1)
            target = y[idx].to(vlm.device)
            logits = [head(pooled) for head in heads]
            loss = sum(torch.nn.functional.cross_entropy(lg, target[:, j]) for j, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps:
                acc = torch.stack([lg.argmax(-1) == target[:, j] for j, lg in enumerate(logits)]).float().mean()
                log.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(acc.item(), 4)})
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return log
