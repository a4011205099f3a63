"""``VLM``: one Qwen2-VL / Qwen2.5-VL model with its processor: preprocess, prompt, score, generate, save.

- ``VLM``: the model, its processor and tokenizer, a differentiable image preprocessing
  (``preprocess``), chat formatting, batched greedy ``generate``, ``option_logprobs`` (one forward
  pass, no generation) and ``sequence_nll`` (teacher forcing, differentiable w.r.t. the images);
  ``save`` and PEFT LoRA (``add_lora``, ``merge_lora``).
- ``ImageEmbeds``: the vision tower's output, which the scoring methods take in place of images.
- ``vision_tower``: a ``VLM``'s vision encoder; ``ARCHS``: the supported architectures.

Images everywhere are float tensors (B,3,H,W) in [0,1] with H and W multiples of 28 (patch 14 x
merge 2); ``data.load_image(path, size=...)`` resizes to that grid. On the grid the torch
preprocessing equals the HF processor's to float rounding, so attacks and noise act on real pixels.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import prompts
from .processor import IMAGE_TOKEN

SETTINGS_FILE = "safemed_vlm.json"
ARCHS = ("qwen2_vl", "qwen2_5_vl")
PROMPT_CACHE_SIZE = 4096  # tokenized prompts a VLM keeps (VLM.prompt_ids)


def _model_class(arch: str):
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")
    name = "Qwen2VLForConditionalGeneration" if arch == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"
    return getattr(transformers, name)


@dataclasses.dataclass
class ImageEmbeds:
    """What the language model reads in place of a batch of images: the vision tower's merged outputs
    (``VLM.encode_images``). ``embeds``: (B, image tokens, hidden); ``grid``: (B, 3), the images'
    ``image_grid_thw``. ``sequence_nll`` and ``option_logprobs`` take it wherever they take images,
    so a fixed vision tower need not see the same image twice (``sft.train_sft`` caches them)."""
    embeds: torch.Tensor
    grid: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def stack(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "ImageEmbeds":
        """One batch from (embeds, grid) rows of single images (what indexing ``embeds`` and ``grid`` gives)."""
        if len({tuple(e.shape) for e, _ in rows}) != 1:
            raise ValueError(f"ImageEmbeds.stack: the images have different token counts "
                             f"{sorted({tuple(e.shape) for e, _ in rows})}; batch same-size images")
        return ImageEmbeds(torch.stack([e for e, _ in rows]), torch.stack([g for _, g in rows]))


class VLM:
    """One Qwen2-VL-family model with its processor, ready for the workbook's uses.

    Attributes: ``model``, ``processor``, ``tokenizer``, ``arch`` ("qwen2_vl" | "qwen2_5_vl"),
    ``image_size`` (the square side images are stored at for this model, or None), ``device``.
    """

    def __init__(self, model, processor, *, arch: str, image_size: int | None = None):
        if arch not in ARCHS:
            raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")
        self.model, self.processor, self.arch = model, processor, arch
        self.image_size = None if image_size is None else int(image_size)
        ip = processor.image_processor
        if not (ip.do_rescale and abs(ip.rescale_factor - 1 / 255) < 1e-9 and ip.do_normalize):
            raise ValueError("the image processor must rescale by 1/255 and normalize (Qwen2-VL's settings); "
                             f"got do_rescale={ip.do_rescale}, rescale_factor={ip.rescale_factor}, "
                             f"do_normalize={ip.do_normalize}")
        self.patch_size, self.merge_size = int(ip.patch_size), int(ip.merge_size)
        self.temporal_patch_size = int(ip.temporal_patch_size)
        self.factor = self.patch_size * self.merge_size
        self.min_pixels, self.max_pixels = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)
        self._letter_ids: dict[str, int] | None = None
        # Memo of tokenized chat prompts (see prompt_ids); ``cache_prompts=False`` turns it off.
        self.cache_prompts = True
        self._prompt_ids: dict[tuple[str, int], list[int]] = {}

    # ------------------------------------------------------------------ basics
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "VLM":
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"VLM(arch={self.arch}, params={n:,}, image_size={self.image_size}, device={self.device})"

    # ------------------------------------------------------------- preprocessing
    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable Qwen2-VL image preprocessing.

        ``images``: a float tensor (B,3,H,W) in [0,1] (or a list of (3,H,W) tensors), H and W
        multiples of 28 and H*W within the processor's pixel range, i.e. the sizes the HF processor
        leaves unresized. Off-grid input raises ValueError (``data.load_image(path, size=...)``
        resizes). Values are not clamped, so Gaussian noise for smoothing passes through.

        Returns ``pixel_values`` (sum of H*W/196 rows, 3*2*14*14 columns: CLIP-normalized patches
        in the merge-window order, the frame repeated for the temporal patch) and
        ``image_grid_thw`` (B,3) = (1, H/14, W/14), exactly as ``Qwen2VLImageProcessorPil`` makes them
        from the uint8 image ``round(255 * x)`` (the 1/255 rescale is implicit in [0,1] input).
        """
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be (B,3,H,W), got shape {tuple(images.shape)}")
            if not images.is_floating_point():
                raise ValueError(f"images must be a float tensor in [0,1], got {images.dtype}")
            # one batched reshape for a same-size batch (the common case; no per-image loop)
            p, grid = self._patchify(images, "in the batch")
            return p, torch.tensor([grid] * images.shape[0], dtype=torch.long, device=p.device)
        rows, grids = [], []
        for i, x in enumerate(images):
            if x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(f"image {i} must be (3,H,W), got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise ValueError(f"image {i} must be a float tensor in [0,1], got {x.dtype}")
            p, grid = self._patchify(x[None], i)
            rows.append(p)
            grids.append(grid)
        return torch.cat(rows), torch.tensor(grids, dtype=torch.long, device=rows[0].device)

    def _patchify(self, x: torch.Tensor, index) -> tuple[torch.Tensor, list[int]]:
        """(B,C,H,W) same-size images -> (B*H*W/196, C*2*14*14) rows, image after image, and the
        (1, H/14, W/14) grid they share. ``index`` names the image(s) in errors."""
        B, C, H, W = x.shape
        if H % self.factor or W % self.factor:
            raise ValueError(f"image {index} is {H}x{W}; height and width must be multiples of {self.factor} "
                             f"(load it with data.load_image(path, size=...) to resize onto the grid)")
        if not self.min_pixels <= H * W <= self.max_pixels:
            raise ValueError(f"image {index} is {H}x{W} = {H * W} pixels, outside the processor's range "
                             f"[{self.min_pixels}, {self.max_pixels}] (the HF processor would resize it)")
        ps, m, tps = self.patch_size, self.merge_size, self.temporal_patch_size
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # normalize in float32 like the HF processor; _encode casts to the model dtype
        x = (x - self._mean.to(x)) / self._std.to(x)
        gh, gw = H // ps, W // ps
        # (B, gh/m, gw/m, m, m, C, ps, ps): merge windows first, image after image
        p = x.reshape(B, C, gh // m, m, ps, gw // m, m, ps).permute(0, 2, 5, 3, 6, 1, 4, 7)
        p = p.unsqueeze(6).expand(*p.shape[:6], tps, ps, ps)  # the frame repeated in time
        return p.reshape(B * gh * gw, C * tps * ps * ps), [1, gh, gw]

    # ------------------------------------------------------------ chat formatting
    def chat_prompt(self, item: Any, mode: str, n_image_tokens: int = 1) -> str:
        """The chat-formatted prompt text for one item (user turn: image + ``build_prompt``),
        ending with the assistant header, with ``n_image_tokens`` image placeholders."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompts.build_prompt(item, mode)}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"chat template produced {text.count(IMAGE_TOKEN)} image placeholders, expected 1")
        return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)

    def prompt_ids(self, item: Any, mode: str, n_image_tokens: int) -> list[int]:
        """Token ids of ``chat_prompt(item, mode, n_image_tokens)``.

        Memoized on (the user text, the number of image tokens): an attack or a certification
        scores the same prompt tens to thousands of times with other pixels, and rendering the
        chat template and tokenizing it each time costs about as much as the tiny model's forward
        pass over a few items (``benchmarks/bench_opt.py`` measures it). The memo holds at most
        ``PROMPT_CACHE_SIZE`` prompts (cleared when full); it never changes a result.
        """
        key = (prompts.build_prompt(item, mode), int(n_image_tokens))
        ids = self._prompt_ids.get(key) if self.cache_prompts else None
        if ids is None:
            ids = self.tokenizer(self.chat_prompt(item, mode, n_image_tokens), add_special_tokens=False)["input_ids"]
            if self.cache_prompts:
                if len(self._prompt_ids) >= PROMPT_CACHE_SIZE:
                    self._prompt_ids.clear()
                self._prompt_ids[key] = ids
        return ids

    def encode_images(self, images: torch.Tensor) -> ImageEmbeds:
        """The vision tower's output for same-size images (B,3,H,W) in [0,1] (``preprocess``, then the
        model's ``get_image_features``): what ``sequence_nll`` / ``option_logprobs`` would compute from
        ``images``, to pass them instead. Follows the caller's grad mode."""
        pixel_values, grid = self.preprocess(images)
        dev = self.device
        feats = self.model.get_image_features(pixel_values.to(dev, self.model.dtype), grid.to(dev)).pooler_output
        return ImageEmbeds(torch.stack(list(feats)), grid.to(dev))

    def _encode(self, images, items: Sequence[Any], mode: str, suffixes: Sequence[list[int]] | None = None,
                ) -> tuple[dict, list[int]]:
        """Left-padded model inputs for image + prompt (+ optional token suffixes per row); ``images``
        may be ``ImageEmbeds`` (the vision tower's output) instead.

        Returns the inputs dict and each row's suffix length."""
        items = list(items)
        embeds = images if isinstance(images, ImageEmbeds) else None
        pixel_values, grid = (None, embeds.grid) if embeds is not None else self.preprocess(images)
        if len(items) != grid.shape[0]:
            raise ValueError(f"{grid.shape[0]} images for {len(items)} items")
        n_tokens = (grid.prod(-1) // self.merge_size ** 2).tolist()
        tok = self.tokenizer
        rows = [self.prompt_ids(it, mode, n) for it, n in zip(items, n_tokens)]
        suffixes = [list(s) for s in suffixes] if suffixes is not None else [[] for _ in rows]
        rows = [r + s for r, s in zip(rows, suffixes)]
        T = max(map(len, rows))
        pad = tok.pad_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
        dev = self.device
        ids, mask = ids.to(dev), mask.to(dev)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_id).long() * mask,
                      image_grid_thw=grid.to(dev))
        if embeds is None:
            inputs["pixel_values"] = pixel_values.to(dev, self.model.dtype)
        else:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(embeds.embeds))}
        return inputs, [len(s) for s in suffixes]

    def _target_ids(self, text: str, add_eos: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + ([self.tokenizer.convert_tokens_to_ids("<|im_end|>")] if add_eos else [])

    # ----------------------------------------------------------------- scoring
    def sequence_nll(self, images, items: Sequence[Any], targets: Sequence[str], prompt: str = "nothink",
                     reduction: str = "mean", add_eos: bool = True, extras: dict | None = None,
                     uniform_over: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Teacher-forced negative log-likelihood of each target completion, shape (B,).

        The target is tokenized on its own (as the model would emit it after the assistant header)
        and, with ``add_eos``, followed by ``<|im_end|>``, which is scored too. ``reduction``:
        "mean" (per target token; SFT's loss) or "sum" (the sequence's total NLL = -log p(target)).
        Differentiable w.r.t. ``images`` and the weights; follows the caller's grad mode.
        ``extras``: a dict that receives the model's outputs with hidden states and attention weights
        (``outputs``; attention weights need eager attention), the ``inputs`` and each row's target
        length (``lengths``), for auxiliary losses (``binding.binding_loss``).
        ``uniform_over``: per row, token ids that stand for one another: where the target has one of
        them, the score is the cross-entropy against the uniform distribution over the set, -mean(log p)
        (a format-only warm-up: an option letter, each equally likely, never which one is right; the
        set's total probability, -log sum p, would collapse onto whichever letter leads).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        targets = list(targets)
        if len(targets) != len(list(items)):
            raise ValueError(f"{len(targets)} targets for {len(list(items))} items")
        suffixes = [self._target_ids(t, add_eos) for t in targets]
        if min(map(len, suffixes)) == 0:
            raise ValueError("empty target with add_eos=False: nothing to score")
        inputs, lengths = self._encode(images, items, prompt, suffixes)
        K = max(lengths)
        want = extras is not None
        out = self.model(**inputs, logits_to_keep=K + 1, output_hidden_states=want, output_attentions=want)
        if want:
            extras.update(outputs=out, inputs=inputs, lengths=lengths)
        logits = out.logits[:, :-1].float()  # predicts the last K tokens
        labels = inputs["input_ids"][:, -K:]
        steps = torch.arange(K, device=labels.device)
        tmask = (steps[None, :] >= (K - torch.tensor(lengths, device=labels.device))[:, None]).float()
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(-1, labels[..., None]).squeeze(-1)
        if uniform_over is not None:
            if len(uniform_over) != len(targets):
                raise ValueError(f"uniform_over has {len(uniform_over)} rows for {len(targets)} targets")
            allowed = torch.zeros(logp.shape[0], logp.shape[-1], dtype=torch.bool, device=logp.device)
            for b, ids in enumerate(uniform_over):
                allowed[b, list(ids)] = True
            in_set = allowed.gather(1, labels) & tmask.bool()
            weights = (allowed / allowed.sum(-1, keepdim=True))[:, None, :]  # (B, 1, V): uniform on the set
            set_nll = -(logp * weights).sum(-1)
            nll = torch.where(in_set, set_nll, nll)
        total = (nll * tmask).sum(-1)
        return total / tmask.sum(-1) if reduction == "mean" else total

    def letter_token_ids(self, n: int = 5) -> list[int]:
        """Token ids of the answer letters as they follow ``"<answer>"`` (``" A"``, ``" B"``, ...,
        Med-R1's ``"<answer> C </answer>"`` format). Raises if a letter is not one token there."""
        if self._letter_ids is None:
            tok, prefix = self.tokenizer, prompts.ANSWER_PREFIX
            base = tok(prefix, add_special_tokens=False)["input_ids"]
            ids = {}
            for letter in prompts.LETTERS[:5]:
                full = tok(f"{prefix} {letter}", add_special_tokens=False)["input_ids"]
                if full[:-1] != base or len(full) != len(base) + 1:
                    raise ValueError(f"the tokenizer does not emit {letter!r} after {prefix!r} as one token "
                                     f"({full} vs prefix {base}); option_logprobs needs single-token letters")
                ids[letter] = full[-1]
            self._letter_ids = ids
        if n > len(self._letter_ids):
            raise ValueError(f"at most {len(self._letter_ids)} options are supported, got {n}")
        return [self._letter_ids[letter] for letter in prompts.LETTERS[:n]]

    def next_token_logprobs(self, images, items: Sequence[Any], prompt: str = "nothink",
                            prefix: str = "") -> torch.Tensor:
        """(B, vocab) log-probabilities (full log-softmax, float32) of the token after the prompt and
        the teacher-forced ``prefix`` ("" : the completion's first token). One forward pass; follows
        the caller's grad mode (differentiable w.r.t. ``images``)."""
        items = list(items)
        ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        inputs, _ = self._encode(images, items, prompt, [ids] * len(items))
        return torch.log_softmax(self.model(**inputs, logits_to_keep=1).logits[:, -1].float(), -1)

    def option_logprobs(self, images, items: Sequence[Any], prompt: str = "nothink") -> list[torch.Tensor]:
        """Log-probability of each option letter right after the teacher-forced ``"<answer>"``.

        One forward pass, no generation: the assistant turn is forced to start with ``"<answer>"``
        and the next-token log-probabilities of ``" A"``, ``" B"``, ... are read (full-vocabulary
        log-softmax, not renormalized over the options). Returns one tensor (n_options,) per item.
        Valid for answer-first models (``nothink`` / ``think_after``), whose completions start with
        ``"<answer>"``; for ``think`` models it skips the reasoning, so use ``generate`` there.
        Follows the caller's grad mode (differentiable w.r.t. ``images``).
        """
        items = list(items)
        logp = self.next_token_logprobs(images, items, prompt, prefix=prompts.ANSWER_PREFIX)
        return [logp[b, self.letter_token_ids(len(it.options))] for b, it in enumerate(items)]

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, images, items: Sequence[Any], prompt: str = "think", max_new_tokens: int = 256,
                 return_ids: bool = False, **generate_kwargs) -> list[str] | torch.Tensor:
        """Batched greedy decoding (``do_sample=False``); returns the decoded completions only
        (special tokens removed), or with ``return_ids`` their token ids (B, new tokens; right-padded
        with the pad id after an end). ``prompt`` is one mode for all items or a list, one per item."""
        items = list(items)
        if isinstance(images, ImageEmbeds):
            raise TypeError("generate takes images, not ImageEmbeds (only sequence_nll and option_logprobs do)")
        modes = [prompt] * len(items) if isinstance(prompt, str) else list(prompt)
        if len(modes) != len(items):
            raise ValueError(f"{len(modes)} prompt modes for {len(items)} items")
        if len(set(modes)) == 1:
            inputs, _ = self._encode(images, items, modes[0])
        else:  # per-item modes: encode rows separately, then merge with one left padding
            inputs = self._encode_mixed(images, items, modes)
        tok = self.tokenizer
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        kwargs.update(generate_kwargs)
        if not kwargs.get("do_sample"):
            kwargs.update(temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**inputs, **kwargs)
        finally:
            self.model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:]
        return new if return_ids else tok.batch_decode(new, skip_special_tokens=True)

    def _encode_mixed(self, images, items, modes) -> dict:
        if isinstance(images, ImageEmbeds):
            raise TypeError("generate with one prompt mode per item takes images, not ImageEmbeds")
        if isinstance(images, torch.Tensor):
            images = list(images)
        parts = [self._encode([img], [it], mode)[0] for img, it, mode in zip(images, items, modes)]
        T = max(p["input_ids"].shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id

        def left(t, value):
            return F.pad(t, (T - t.shape[1], 0), value=value)

        return dict(input_ids=torch.cat([left(p["input_ids"], pad) for p in parts]),
                    attention_mask=torch.cat([left(p["attention_mask"], 0) for p in parts]),
                    mm_token_type_ids=torch.cat([left(p["mm_token_type_ids"], 0) for p in parts]),
                    pixel_values=torch.cat([p["pixel_values"] for p in parts]),
                    image_grid_thw=torch.cat([p["image_grid_thw"] for p in parts]))

    # -------------------------------------------------------------- save / LoRA
    def settings(self) -> dict:
        """The wrapper's own settings, saved beside the weights."""
        return {"arch": self.arch, "image_size": self.image_size, "format": "safemed_vlm/1"}

    def save(self, path: str | Path) -> Path:
        """Write safetensors weights, config, tokenizer, processor and ``safemed_vlm.json`` to ``path``.

        A PEFT-wrapped model saves its adapter only (load it with ``load_vlm(base, lora=path)``) —
        call ``merge_lora()`` first to save full weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)
        (path / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2) + "\n")
        return path

    def add_lora(self, **lora_kwargs) -> "VLM":
        """Wrap the model with a new PEFT LoRA adapter (``peft.LoraConfig(**lora_kwargs)``)."""
        from peft import LoraConfig, get_peft_model

        lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
        self.model = get_peft_model(self.model, LoraConfig(**lora_kwargs))
        return self

    def merge_lora(self) -> "VLM":
        """Merge a PEFT adapter into the base weights (``merge_and_unload``); no-op without one."""
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
        return self


def vision_tower(vlm) -> torch.nn.Module:
    """The vision encoder (patch embedding, blocks, merger) of a Qwen2-VL / Qwen2.5-VL ``VLM``."""
    return vlm.model.model.visual
