"""The objectives PGD ascends on a VLM: the answer's NLL, the first token's, the option-letter margin.

:func:`attack_loss` picks one by ``target`` (``TARGETS``): the teacher-forced cross-entropy of the
ground-truth answer through the model's exact differentiable preprocessing (for think models after
the model's own clean greedy reasoning, ``"clean_reasoning"``: what it regenerates at test time), the
NLL of the model's clean greedy first token (``"first_token"``, the objective of the SafeMed-R1 first
author's evaluation fork, here in a real pixel-space ball), or Carlini & Wagner's margin on the option
letters of an answer-first model (``"margin"``). :mod:`safemed_lib.attacks` runs PGD on them.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from . import prompts

LossFn = Callable[[torch.Tensor], torch.Tensor]

TARGETS = ("auto", "answer", "clean_reasoning", "first_token", "margin")
ANSWER_FIRST = ("nothink", "think_after")  # prompts whose completion starts with "<answer>"
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_TAGS = re.compile(r"<answer>.*?</answer>|</?(think|answer)>", re.DOTALL | re.IGNORECASE)


def _resolve_target(target: str, prompt: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if prompt not in prompts.MODES:
        raise ValueError(f"prompt must be one of {prompts.MODES}, got {prompt!r}")
    if target == "margin" and prompt not in ANSWER_FIRST:
        raise ValueError(f"target 'margin' scores the option letter right after '<answer>', so it needs an "
                         f"answer-first prompt {ANSWER_FIRST}; got prompt {prompt!r} (use 'clean_reasoning')")
    if target == "auto":
        return "answer" if prompt == "nothink" else "clean_reasoning"
    return target


def reasoning_of(output: str) -> str:
    """The reasoning in a generated completion: the text inside its ``<think>`` tags, or, when a
    model wrote no such block, the text left after removing the answer block and any tags."""
    m = _THINK.search(output)
    text = m.group(1) if m else _TAGS.sub(" ", output)
    return " ".join(text.split())


def answer_targets(vlm, items: Sequence, *, prompt: str, target: str = "auto", clean_images=None,
                   clean_outputs: dict[str, str] | None = None, max_new_tokens: int = 256
                   ) -> tuple[list[str], list[str]]:
    """The completions whose likelihood the attack lowers, one per item, and which kind each is.

    ``target="answer"``: the ground-truth answer block alone, ``"<answer> X </answer>"`` (Med-R1's
    format; the natural target of a no-think model). ``"clean_reasoning"``: the model's own greedy
    reasoning on the clean image, then the ground-truth answer, in the prompt's format
    (``prompts.format_completion``): ascending its NLL pushes the model off the reasoning that led
    it to the answer *and* off the true answer given that reasoning, which is what a think model
    regenerates at test time. The reasoning comes from ``clean_outputs[question_id]`` (e.g. the
    ``output`` column of a clean ``evaluate`` run) or, where missing, from one greedy generation on
    ``clean_images``. An item whose clean output holds no reasoning at all falls back to the
    answer target (reported in the second list). ``"auto"``: "answer" for the nothink prompt,
    "clean_reasoning" for think / think_after.
    """
    kind = _resolve_target(target, prompt)
    if kind in ("first_token", "margin"):
        raise ValueError(f"target {kind!r} scores no completion text: use attack_loss")
    items = list(items)
    if kind == "answer":
        return [prompts.format_completion(it.answer, "nothink") for it in items], ["answer"] * len(items)
    outputs = dict(clean_outputs or {})
    missing = [i for i, it in enumerate(items) if it.question_id not in outputs]
    if missing:
        if clean_images is None:
            raise ValueError(f"target 'clean_reasoning' needs the clean outputs of {len(missing)} item(s) "
                             f"(e.g. {items[missing[0]].question_id!r}): pass clean_outputs= or clean_images=")
        texts = vlm.generate(clean_images[missing], [items[i] for i in missing], prompt=prompt,
                             max_new_tokens=max_new_tokens)
        outputs.update({items[i].question_id: t for i, t in zip(missing, texts)})
    targets, kinds = [], []
    for it in items:
        reasoning = reasoning_of(outputs[it.question_id])
        if reasoning:
            targets.append(prompts.format_completion(it.answer, prompt, reasoning))
            kinds.append("clean_reasoning")
        else:
            targets.append(prompts.format_completion(it.answer, "nothink"))
            kinds.append("answer")
    return targets, kinds


def vlm_answer_loss(vlm, items: Sequence, *, prompt: str, target: str = "auto",
                    targets: Sequence[str] | None = None, clean_images=None,
                    clean_outputs: dict[str, str] | None = None, reduction: str = "sum",
                    max_new_tokens: int = 256) -> LossFn:
    """A ``loss_fn`` for :func:`pgd`: ``x -> (B,)`` teacher-forced NLL of the target completions
    (see :func:`answer_targets`, or pass ``targets``) given image ``x`` and the prompt.

    The loss runs through ``vlm.sequence_nll``, i.e. the exact differentiable Qwen2-VL
    preprocessing of the raw [0,1] image, so the attack perturbs real pixels (never the
    normalized ``pixel_values``). ``reduction="sum"`` is -log p(target | image, prompt); "mean"
    divides by the target's length. The end-of-turn token is scored after a complete completion;
    for a think prompt's bare answer target it is not (the model would go on to reason).
    The other objectives ("first_token", "margin") are :func:`attack_loss`'s.
    """
    items = list(items)
    if targets is None:
        targets, _ = answer_targets(vlm, items, prompt=prompt, target=target, clean_images=clean_images,
                                    clean_outputs=clean_outputs, max_new_tokens=max_new_tokens)
    targets = list(targets)
    if len(targets) != len(items):
        raise ValueError(f"{len(targets)} targets for {len(items)} items")
    # after a bare answer block a think / think-after model would go on reasoning, so the
    # end-of-turn token is scored only when some target is a complete completion
    add_eos = prompt == "nothink" or any("<think>" in t for t in targets)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return vlm.sequence_nll(x, items, targets, prompt=prompt, reduction=reduction, add_eos=add_eos)

    return loss_fn


def first_tokens(vlm, images: torch.Tensor, items: Sequence, *, prompt: str) -> list[int]:
    """The id of the first token of each item's clean greedy completion (one decoding step)."""
    return vlm.generate(images, list(items), prompt=prompt, max_new_tokens=1, return_ids=True)[:, 0].tolist()


def first_token_loss(vlm, items: Sequence, *, prompt: str, token_ids: Sequence[int]) -> LossFn:
    """``x -> (B,)`` cross-entropy of ``token_ids`` (one per item) as the completion's first token."""
    items = list(items)
    if len(token_ids) != len(items):
        raise ValueError(f"token_ids: {len(token_ids)} ids for {len(items)} items")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=vlm.device).view(-1, 1)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return -vlm.next_token_logprobs(x, items, prompt).gather(1, ids).squeeze(1)

    return loss_fn


def option_margin(logps: Sequence[torch.Tensor], answers: Sequence[int]) -> torch.Tensor:
    """Carlini & Wagner's margin, ``max_{j != y} s_j - s_y``, per item (B,): positive exactly when a
    wrong option outscores the right one ``y``. On log-probs it equals the margin of the logits
    (the log-softmax shifts every letter by the same normalizer)."""
    out = []
    for s, y in zip(logps, answers):
        if not 0 <= y < len(s) or len(s) < 2:
            raise ValueError(f"answers: option index {y} for {len(s)} options")
        out.append(torch.cat([s[:y], s[y + 1:]]).max() - s[y])
    return torch.stack(out)


def margin_loss(vlm, items: Sequence, *, prompt: str) -> LossFn:
    """``x -> (B,)`` :func:`option_margin` of ``vlm.option_logprobs`` (the letter right after the
    teacher-forced ``"<answer>"``) against each item's true letter; answer-first prompts only."""
    _resolve_target("margin", prompt)
    items = list(items)
    answers = [prompts.LETTERS.index(it.answer.strip().upper()) for it in items]
    return lambda x: option_margin(vlm.option_logprobs(x, items, prompt=prompt), answers)


def attack_loss(vlm, items: Sequence, *, prompt: str, target: str = "auto", clean_images=None,
                clean_outputs: dict[str, str] | None = None, reduction: str = "sum",
                max_new_tokens: int = 256) -> tuple[LossFn, list[str]]:
    """The ``loss_fn`` that :func:`pgd` ascends for objective ``target``, and its kind per item.

    "answer" / "clean_reasoning" / "auto": :func:`vlm_answer_loss`. "first_token": the NLL of the
    first token the model emits greedily on the clean image (``clean_images`` needed), fixed for
    the whole attack: the attack succeeds in its own terms once that token is no longer the
    greedy choice. (The fork, IgoyAI/AdvMed-R1, re-takes the argmax at every step, i.e. lowers
    whichever token is on top; both start from the same token without a random start.) For the
    ``"<answer>"`` / ``"<think>"`` formats that first token is a format token, not the answer, so
    the objective is a weak proxy for a wrong answer. "margin": :func:`margin_loss`.
    """
    kind, items = _resolve_target(target, prompt), list(items)
    if kind == "margin":
        return margin_loss(vlm, items, prompt=prompt), ["margin"] * len(items)
    if kind == "first_token":
        if clean_images is None:
            raise ValueError("target 'first_token' needs clean_images= (its target is the clean first token)")
        ids = first_tokens(vlm, clean_images, items, prompt=prompt)
        return first_token_loss(vlm, items, prompt=prompt, token_ids=ids), ["first_token"] * len(items)
    targets, kinds = answer_targets(vlm, items, prompt=prompt, target=target, clean_images=clean_images,
                                    clean_outputs=clean_outputs, max_new_tokens=max_new_tokens)
    return vlm_answer_loss(vlm, items, prompt=prompt, targets=targets, reduction=reduction), kinds
