"""What a real VLM brings from pretraining, given to the tiny base: in-context copying and a
vision tower whose features say what the image shows.

A Qwen2-VL checkpoint arrives able to copy from its context (induction heads: having seen
``... x y ...``, on meeting ``x`` again predict ``y``). The tiny model is trained from scratch, and
without that ability it never learns the multiple-choice step of copying an option from the prompt
(docs/lab_notes.md, What the tiny model needs to read the image: SFT alone stays at chance).
:func:`copy_pretrain` gives it the ability the way it arises in language models, on text that
repeats itself: random token sequences shown twice, the loss on the second copy. No benchmark text,
image or answer is involved; on the tiny model the copy accuracy goes from 0 to 1 within about 200
steps; the base takes 400 (about 30 s on one core).

Qwen2-VL's vision encoder arrives pretrained on image-text pairs (its first training stage). The tiny
model's does not, and trained only through the language model's SFT loss it learns the image poorly
(docs/lab_notes.md, What the tiny model needs to read the image). :func:`vision_pretrain` is the
tiny stand-in for that stage: a linear head per scene attribute (:data:`SCENE_ATTRIBUTES`, the
image's "caption") on the mean of the vision tower's merged tokens, trained on the training split's
images; the heads are then thrown away. It never sees a question, an option or an answer letter.
Where things are needs two more heads (the same section, its paragraph on position): nothing in
Qwen2-VL gives a token its absolute position as content (the tower's and the language model's rotary
embeddings only shape attention), so each merged token also learns to name its row and column (Zhai
et al., ICML 2022), and an attention-pooled head (learned queries, no positional information: the
lookup the language model's attention can make) reads which image quadrants hold a lesion
(:func:`scene_quadrants`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from .models import vision_tower
from .synth import QUADRANTS


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
SCENE_ATTRIBUTES = ("modality", "anatomy", "finding", "grade", "count", "style")


def _check_scene(scene: dict) -> None:
    missing = [k for k in ("modality", "lesions") if k not in scene]
    if missing:
        raise ValueError(f"scene {scene.get('image', '?')}: missing {missing}")


def scene_labels(scene: dict) -> dict[str, str]:
    """The caption :func:`vision_pretrain` predicts for one embedded-benchmark scene
    (``synth.load_scenes`` values): each of :data:`SCENE_ATTRIBUTES` as a string, "none" where the
    scene has no such attribute (no anatomy for a dermoscopy image, no style for an MRI). A scene
    without a modality or a lesion list is an error."""
    _check_scene(scene)
    return {a: "none" if scene.get(a) is None else str(scene[a]) for a in SCENE_ATTRIBUTES}


def scene_quadrants(scene: dict) -> list[float]:
    """Which of :data:`QUADRANTS` hold a lesion of the scene (1.0 / 0.0 each; all 0 for a normal
    image). An unknown quadrant name or a broken scene is an error that names the image."""
    _check_scene(scene)
    where = [0.0] * len(QUADRANTS)
    for les in scene["lesions"]:
        if les.get("quadrant") not in QUADRANTS:
            raise ValueError(f"scene {scene.get('image', '?')}: lesion quadrant {les.get('quadrant')!r} "
                             f"is not one of {QUADRANTS}")
        where[QUADRANTS.index(les["quadrant"])] = 1.0
    return where


def image_tokens(vlm, images: torch.Tensor) -> torch.Tensor:
    """(B, tokens, hidden): the merged visual tokens the language model receives for ``images``
    ((B,3,H,W) in [0,1], one on-grid size)."""
    pixel_values, grid = vlm.preprocess(images.to(vlm.device))
    out = vlm.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.reshape(images.shape[0], -1, out.shape[-1])


class AttentionPool(torch.nn.Module):
    """Multi-head attention pooling with learned queries (SigLIP's "MAP" head): (B, T, H) tokens to
    (B, queries * H). It adds no positional information, so what it reads must be in the tokens'
    content, as for the language model's attention over the image tokens."""

    def __init__(self, hidden: int, queries: int = 4, heads: int = 4):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.attention = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens)
        return out.flatten(1)


def _grid_positions(vlm, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Row and column of each merged token of an image of ``image``'s size, and the merged grid."""
    _, grid = vlm.preprocess(image[None].to(vlm.device))
    m = vlm.model.config.vision_config.spatial_merge_size
    h, w = int(grid[0, 1]) // m, int(grid[0, 2]) // m
    k = torch.arange(h * w)
    return k // w, k % w, h, w


def vision_pretrain(vlm, images: torch.Tensor, labels: Sequence[dict[str, str]], steps: int, *, seed: int = 0,
                    batch_size: int = 32, lr: float = 2e-3, where: torch.Tensor | None = None,
                    position_weight: float = 0.0) -> list[dict]:
    """Train ``vlm``'s vision tower (and its merger) in place to say what each image shows.

    ``images``: (N,3,H,W) in [0,1]; ``labels``: N dicts with the same keys (e.g.
    :func:`scene_labels`), string values. One linear head per key reads the mean of the image's
    merged tokens (the language model attends over those tokens, so what the heads need must be
    readable from their average); the summed cross-entropy trains tower and heads with AdamW at a
    constant ``lr``, without clipping (the setting measured in docs/lab_notes.md, What the tiny
    model needs to read the image). The heads are discarded. Deterministic for a ``seed`` (the
    caller's RNG is untouched). Returns a log row (step, loss, accuracy: the share of the batch's
    labels right) every 100 steps and at the end.

    ``where``: an optional (N, K) 0/1 tensor (e.g. :func:`scene_quadrants`), read by an
    :class:`AttentionPool` head with binary cross-entropy (log: ``where_accuracy``, the share of
    images with all K right). ``position_weight``: weight of a per-token loss in which every merged
    token names its row and its column (log: ``position_accuracy``)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if len(labels) != len(images) or not len(images):
        raise ValueError(f"vision_pretrain: {len(images)} images but {len(labels)} label rows")
    keys = sorted(labels[0])
    if any(sorted(row) != keys for row in labels):
        raise ValueError(f"vision_pretrain: every label row needs the keys {keys}")
    if where is not None and (where.ndim != 2 or len(where) != len(images) or not bool(((where == 0) | (where == 1)).all())):
        raise ValueError(f"vision_pretrain: where must be a 0/1 tensor of shape ({len(images)}, K), "
                         f"got shape {tuple(where.shape)}")
    if position_weight < 0:
        raise ValueError(f"position_weight must be >= 0, got {position_weight!r}")
    classes = {k: sorted({row[k] for row in labels}) for k in keys}
    y = torch.tensor([[classes[k].index(row[k]) for k in keys] for row in labels])
    model = vlm.model
    tower = vision_tower(vlm)
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = image_tokens(vlm, images[:1]).shape[-1]
        pool = AttentionPool(hidden).to(vlm.device) if where is not None else None
        heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(classes[k])) for k in keys).to(vlm.device)
        extra = torch.nn.ModuleList()
        if pool is not None:
            where_head = torch.nn.Linear(pool.query.shape[0] * hidden, where.shape[1]).to(vlm.device)
            where = where.float().to(vlm.device)
            extra.extend([where_head, pool])
        if position_weight:
            rows, cols, h, w = _grid_positions(vlm, images[0])
            row_head, col_head = torch.nn.Linear(hidden, h).to(vlm.device), torch.nn.Linear(hidden, w).to(vlm.device)
            rows, cols = rows.repeat(batch_size).to(vlm.device), cols.repeat(batch_size).to(vlm.device)
            extra.extend([row_head, col_head])
        params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters()) + list(extra.parameters())
        opt = torch.optim.AdamW(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        model.train()
        log = []
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(images), (batch_size,), generator=g)
            tokens = image_tokens(vlm, images[idx])
            pooled = tokens.mean(1)
            target = y[idx].to(vlm.device)
            logits = [head(pooled) for head in heads]
            loss = sum(torch.nn.functional.cross_entropy(lg, target[:, j]) for j, lg in enumerate(logits))
            if pool is not None:
                where_logits = where_head(pool(tokens))
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(where_logits, where[idx])
            if position_weight:
                flat = tokens.flatten(0, 1)
                row_logits, col_logits = row_head(flat), col_head(flat)
                loss = loss + position_weight * (torch.nn.functional.cross_entropy(row_logits, rows)
                                                 + torch.nn.functional.cross_entropy(col_logits, cols))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps:
                acc = torch.stack([lg.argmax(-1) == target[:, j] for j, lg in enumerate(logits)]).float().mean()
                row = {"step": step, "loss": round(loss.item(), 4), "accuracy": round(acc.item(), 4)}
                if pool is not None:
                    row["where_accuracy"] = round(((where_logits > 0).float() == where[idx]).all(1).float().mean().item(), 4)
                if position_weight:
                    row["position_accuracy"] = round(((row_logits.argmax(-1) == rows).float().mean().item()
                                                      + (col_logits.argmax(-1) == cols).float().mean().item()) / 2, 4)
                log.append(row)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return log
