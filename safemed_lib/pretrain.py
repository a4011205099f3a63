"""In-context copying for the tiny base: what a real language model brings from pretraining.

A Qwen2-VL checkpoint arrives able to copy from its context (induction heads: having seen
``... x y ...``, on meeting ``x`` again predict ``y``). The tiny model is trained from scratch, and
without that ability it never learns the multiple-choice step of copying an option from the prompt
(docs/tiny_model_learnability.md: SFT alone stays at chance). :func:`copy_pretrain` gives it the
ability the way it arises in language models, on text that repeats itself: random token sequences
shown twice, the loss on the second copy. No benchmark text, image or answer is involved; on the
tiny model the copy accuracy goes from 0 to 1 within about 200 steps; the base takes 400 (about 30 s on one core).
"""
from __future__ import annotations

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
