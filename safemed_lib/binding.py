"""Auxiliary option-binding losses for answer-only SFT of a small model.

An answer-only model has to do two things inside one forward pass: judge each option's text
against the image, and copy the letter in front of the option that matches ("multiple-choice symbol
binding", Robinson et al., ICLR 2023). The 2-layer tiny model trained on the letter alone stays at
chance (docs/lab_notes.md, Answer-only SFT): it learns neither step from one letter
target per question. These losses supervise each step where a 2-layer model can do it, all but
``scene`` from the answer key alone (no scene metadata, so they work on any multiple-choice data):

* ``match``: a linear head on the hidden state after layer ``layer`` of every option token says
  whether its option is the right one (binary cross-entropy);
* ``letter``: a linear head on the same states names the option's letter (cross-entropy), so the
  letter is there to be copied;
* ``attention``: head ``head`` of the last layer (or each of a list of heads, the terms averaged),
  at the position that emits the answer letter, should attend to the right option's tokens (minus
  the log of its attention mass on them);
* ``content``: a linear head on the hidden state after layer ``layer`` at the position that emits
  the letter scores each option (the mean of its tokens' logits; cross-entropy over the options),
  so the question the last layer asks the options is already the answer's content;
* ``scene`` (embedded benchmark only: it needs the scene metadata SFT-think's rationales come from):
  one linear head per scene attribute (``pretrain.SCENE_ATTRIBUTES``, the vision pretraining's
  caption) on the same state names the image's attribute, whatever the question asks, so that state
  describes the whole image (cross-entropy per attribute, averaged). It carries to answer-only SFT
  the per-image supervision SFT-think gets from its rationale.

``content`` and ``scene`` are off at weight 0 (``DEFAULTS``; the default ``sft.nothink.binding``
turns them on). The heads are thrown away after training: the checkpoint is the plain model, scored
answer-only like any other. ``sft.train_sft`` adds the weighted sum to the SFT loss when its recipe
has binding terms (``config.SFTRecipe.binding``, a ``config.Binding``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import pretrain, prompts

DEFAULTS = {"match": 1.0, "letter": 1.0, "attention": 1.0, "content": 0.0, "scene": 0.0, "layer": 1, "head": 0}


def settings(binding_aux: dict | bool | None) -> dict | None:
    """The complete settings (``DEFAULTS`` overridden by ``binding_aux``), or None for no auxiliary
    losses. ``True`` means the defaults. Unknown keys and bad values raise, naming the key."""
    if binding_aux is None or binding_aux is False:
        return None
    given = {} if binding_aux is True else dict(binding_aux)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"binding_aux: unknown keys {unknown}; expected some of {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **given}
    for key in ("match", "letter", "attention", "content", "scene"):
        if not (isinstance(out[key], (int, float)) and out[key] >= 0):
            raise ValueError(f"binding_aux[{key!r}] must be a weight >= 0, got {out[key]!r}")
        out[key] = float(out[key])
    def whole(v, least):
        return not isinstance(v, bool) and isinstance(v, int) and v >= least
    if not whole(out["layer"], 1):
        raise ValueError(f"binding_aux['layer'] must be an integer >= 1, got {out['layer']!r}")
    head = out["head"]
    if isinstance(head, (list, tuple)):
        if not head or not all(whole(h, 0) for h in head) or len(set(head)) != len(head):
            raise ValueError(f"binding_aux['head'] must be an integer >= 0 or a non-empty list of distinct "
                             f"ones, got {head!r}")
        out["head"] = list(head)
    elif not whole(head, 0):
        raise ValueError(f"binding_aux['head'] must be an integer >= 0 or a list of them, got {head!r}")
    return out


def check_model(vlm, cfg: dict) -> None:
    """Raise if ``vlm``'s language model has no layer ``cfg['layer']`` below its last, or no
    attention head ``cfg['head']`` (each of them, for a list)."""
    text = getattr(vlm.model.config, "text_config", vlm.model.config)
    if cfg["layer"] >= text.num_hidden_layers:
        raise ValueError(f"binding_aux['layer']={cfg['layer']} must be below the language model's "
                         f"{text.num_hidden_layers} layers (the last layer copies the letter)")
    if max(_heads(cfg)) >= text.num_attention_heads:
        raise ValueError(f"binding_aux['head']={cfg['head']}: the model has {text.num_attention_heads} attention "
                         f"heads (0 to {text.num_attention_heads - 1})")


def _heads(cfg: dict) -> list[int]:
    """The supervised last-layer heads, as a list."""
    return cfg["head"] if isinstance(cfg["head"], list) else [cfg["head"]]


def option_token_labels(vlm, item: Any, mode: str, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """For every token of ``vlm.prompt_ids(item, mode, n_image_tokens)``: whether it belongs to
    the right option (1), a wrong one (0) or no option (-1), and the index of its option (-1)."""
    text = vlm.chat_prompt(item, mode, n_image_tokens)
    enc = vlm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != vlm.prompt_ids(item, mode, n_image_tokens):
        raise ValueError(f"{getattr(item, 'question_id', '?')}: the prompt tokenizes differently with offsets")
    problem = prompts.format_problem(item)
    start = text.index(problem) + len(item.question.strip()) + 1  # format_problem: "{question} A)opt, B)opt"
    spans = []
    for i, option in enumerate(item.options):
        head = f"{prompts.LETTERS[i]})"
        if text[start:start + len(head)] != head:
            raise ValueError(f"{getattr(item, 'question_id', '?')}: option {head} not where format_problem puts it")
        spans.append((start + len(head), start + len(head) + len(option)))
        start += len(head) + len(option) + 2  # ", "
    right = [-1] * len(enc["input_ids"])
    which = [-1] * len(enc["input_ids"])
    answer = answer_index(item)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        for i, (s, e) in enumerate(spans):
            if b > s and a < e:
                right[t], which[t] = int(i == answer), i
    return right, which


def scene_classes(scenes: Sequence[dict]) -> dict[str, list[str]]:
    """Each scene attribute's label set (sorted) over ``scenes`` (``synth.load_scenes`` values)."""
    labels = [pretrain.scene_labels(s) for s in scenes]
    return {a: sorted({lab[a] for lab in labels}) for a in pretrain.SCENE_ATTRIBUTES}


class BindingHeads(torch.nn.Module):
    """The linear heads (thrown away after training): match and letter on the option tokens' hidden
    states; with ``vocab_size`` the content head and with ``scene_classes`` (:func:`scene_classes`)
    one head per scene attribute, both on the letter position's."""

    def __init__(self, hidden_size: int, n_letters: int = 5, vocab_size: int | None = None,
                 scene_classes: dict[str, list[str]] | None = None):
        super().__init__()
        self.match = torch.nn.Linear(hidden_size, 1)
        self.letter = torch.nn.Linear(hidden_size, n_letters)
        self.content = None if vocab_size is None else torch.nn.Linear(hidden_size, vocab_size)
        self.scene_classes = scene_classes
        self.scene = None if scene_classes is None else torch.nn.ModuleDict(
            {a: torch.nn.Linear(hidden_size, len(c)) for a, c in scene_classes.items()})


def answer_index(item: Any) -> int:
    """The index of ``item``'s answer letter (A = 0)."""
    return prompts.LETTERS.index(item.answer.strip().upper())


def binding_loss(vlm, heads: BindingHeads, cfg: dict, extras: dict, items: Sequence[Any], mode: str,
                 scenes: Sequence[dict] | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted auxiliary loss for one batch and its parts (floats, plus ``pick``: the share of
    items whose highest-scoring option token belongs to the right option).

    ``extras``: what ``VLM.sequence_nll(..., extras={})`` stored (the model's outputs with hidden
    states and attention weights, the inputs and each row's target length). The targets must start
    with ``prompts.ANSWER_PREFIX`` (answer-first completions).
    ``scenes``: each item's scene (``synth.load_scenes`` values), for heads with scene heads."""
    out, inputs, lengths = extras["outputs"], extras["inputs"], extras["lengths"]
    if out.attentions is None or out.hidden_states is None:
        raise ValueError("binding_loss needs the model's hidden states and attention weights "
                         "(sequence_nll with extras, and eager attention)")
    ids = inputs["input_ids"]
    B, T = ids.shape
    dev = ids.device
    image_id = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_prefix = len(vlm.tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"])
    hidden = out.hidden_states[cfg["layer"]]
    # Each token's labels in the padded batch (-1: no option): whether its option is the right one, which option.
    right = torch.full((B, T), -1, dtype=torch.long)
    which = torch.full((B, T), -1, dtype=torch.long)
    for b, item in enumerate(items):
        r, w = option_token_labels(vlm, item, mode, int((ids[b] == image_id).sum()))
        off = T - len(r) - lengths[b]  # left padding of row b
        right[b, off:off + len(r)] = torch.tensor(r)
        which[b, off:off + len(w)] = torch.tensor(w)
    right, which = right.to(dev), which.to(dev)
    rows = torch.arange(B, device=dev)
    qs = torch.tensor([T - lengths[b] + n_prefix - 1 for b in range(B)], device=dev)  # the positions that emit the letter
    # One indexing per tensor, not one per item: each indexing's backward fills a tensor of its source's size.
    on = right >= 0
    h = hidden[on]  # (option tokens of the batch, hidden), row after row
    y = right[on].float()
    z = heads.match(h).squeeze(-1)
    with torch.no_grad():  # pick: the right option holds the item's highest-scoring token
        best = torch.full((B, T), float("-inf"), device=dev).masked_scatter(on, z.float()).argmax(-1)
        picks = int((right[rows, best] == 1).sum())
    mine = (right == 1).to(hidden.dtype)
    attn = out.attentions[-1][rows, :, qs][:, _heads(cfg)]  # (B, heads, T): attention from the letter position
    parts = {"match": F.binary_cross_entropy_with_logits(z, y),
             "letter": F.cross_entropy(heads.letter(h), which[on]),
             "attention": (-torch.log((attn * mine[:, None]).sum(-1) + 1e-6)).mean()}
    hq = hidden[rows, qs]  # (B, hidden): the state that emits the letter
    if heads.content is not None:  # each option's score: the mean of its tokens' logits
        n_opt = max(len(it.options) for it in items)
        tok = heads.content(hq).gather(1, ids)  # (B, T): each token's logit
        member = (which[..., None] == torch.arange(n_opt, device=dev)).to(tok.dtype)  # (B, T, options)
        count = member.sum(1)
        scores = torch.einsum("bt,bto->bo", tok, member) / count.clamp(min=1)
        scores = scores.masked_fill(count == 0, float("-inf"))  # options an item does not have
        parts["content"] = F.cross_entropy(scores, torch.tensor([answer_index(it) for it in items], device=dev))
    if heads.scene is not None:
        if scenes is None or len(scenes) != len(items):
            raise ValueError("binding_loss: the scene term needs each item's scene (scenes=...)")
        labels = [pretrain.scene_labels(sc) for sc in scenes]
        terms = []
        for a, head in heads.scene.items():
            known = heads.scene_classes[a]
            bad = [lab[a] for lab in labels if lab[a] not in known]
            if bad:
                raise ValueError(f"binding_loss: scene attribute {a!r} label {bad[0]!r} is not one of the "
                                 f"heads' classes {known}")
            y = torch.tensor([known.index(lab[a]) for lab in labels], device=hidden.device)
            terms.append(F.cross_entropy(head(hq), y))
        parts["scene"] = torch.stack(terms).mean()
    loss = sum(cfg[k] * v for k, v in parts.items())
    return loss, {**{k: float(v.detach()) for k, v in parts.items()}, "pick": picks / B}
