"""Qwen2-VL / Qwen2.5-VL behind one small wrapper: build, load, save, preprocess, score, generate.

- ``VLM``: the model, its processor and tokenizer, a differentiable image preprocessing
  (``preprocess``), chat formatting, batched greedy ``generate``, ``option_logprobs`` (one forward
  pass, no generation) and ``sequence_nll`` (teacher forcing, differentiable w.r.t. the images).
- ``build_tiny_vlm``: the real ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL) class with a small
  config and a byte-level BPE tokenizer trained locally; runs on a CPU.
- ``load_vlm``: what ``VLM.save`` wrote, or a real Qwen2-VL / Qwen2.5-VL checkpoint directory
  (safetensors only, no remote code); optional PEFT LoRA.

transformers 5.x trap (STACK_NOTES.md): the default Qwen2-VL image and video processors need
torchvision, which must not be installed here, and ``AutoProcessor`` can silently return just the
tokenizer. So the processor is always built explicitly: ``Qwen2VLImageOnlyProcessor`` (an
image-only ``Qwen2VLProcessor``) around ``Qwen2VLImageProcessorPil``.

Images everywhere are float tensors (B,3,H,W) in [0,1] with H and W multiples of 28 (patch 14 x
merge 2); ``data.load_image(path, size=...)`` resizes to that grid. On the grid the torch
preprocessing equals the HF processor's to float rounding, so attacks and noise act on real pixels.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import prompts

SETTINGS_FILE = "safemed_vlm.json"
ARCHS = ("qwen2_vl", "qwen2_5_vl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
PROMPT_CACHE_SIZE = 4096  # tokenized prompts a VLM keeps (VLM.prompt_ids)
# Qwen2's pre-tokenizer regex, so the tiny tokenizer splits text like the real one does.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The official Qwen2-VL chat template, trimmed: no videos, no vision ids; default system prompt kept.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _processor_class():
    """``Qwen2VLImageOnlyProcessor``: Qwen2VLProcessor without the torchvision-bound video processor."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


_PROCESSOR_CLASS = None


def image_only_processor(image_processor, tokenizer, chat_template: str | None):
    """Build the image-only processor (the class is created once, on first use)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        _PROCESSOR_CLASS = _processor_class()
    return _PROCESSOR_CLASS(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


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
                     reduction: str = "mean", add_eos: bool = True, extras: dict | None = None) -> torch.Tensor:
        """Teacher-forced negative log-likelihood of each target completion, shape (B,).

        The target is tokenized on its own (as the model would emit it after the assistant header)
        and, with ``add_eos``, followed by ``<|im_end|>``, which is scored too. ``reduction``:
        "mean" (per target token; SFT's loss) or "sum" (the sequence's total NLL = -log p(target)).
        Differentiable w.r.t. ``images`` and the weights; follows the caller's grad mode.
        ``extras``: a dict that receives the model's outputs with hidden states and attention weights
        (``outputs``; attention weights need eager attention), the ``inputs`` and each row's target
        length (``lengths``), for auxiliary losses (``binding.binding_loss``).
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
        nll = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
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
        prefix = self.tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        inputs, _ = self._encode(images, items, prompt, [prefix] * len(items))
        logp = torch.log_softmax(self.model(**inputs, logits_to_keep=1).logits[:, -1].float(), -1)
        return [logp[b, self.letter_token_ids(len(it.options))] for b, it in enumerate(items)]

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, images, items: Sequence[Any], prompt: str = "think", max_new_tokens: int = 256,
                 **generate_kwargs) -> list[str]:
        """Batched greedy decoding (``do_sample=False``); returns the decoded completions only
        (special tokens removed). ``prompt`` is one mode for all items or a list, one per item."""
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
        return tok.batch_decode(new, skip_special_tokens=True)

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


# ---------------------------------------------------------------------- building


def vision_tower(vlm) -> torch.nn.Module:
    """The vision encoder (patch embedding, blocks and the merger into the language model's width)
    of a Qwen2-VL / Qwen2.5-VL ``VLM``."""
    return vlm.model.model.visual


def _train_tokenizer(corpus: Sequence[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _tokenizer_corpus(corpus: Sequence[str]) -> list[str]:
    """The caller's texts plus the templates, tags and every canonical answer block, repeated so
    that the answer tokens (e.g. ``" C"``) are merged."""
    extra = [t.replace("{question}", "") for t in prompts.PROMPTS.values()]
    answers = [prompts.format_completion(letter, "nothink") for letter in prompts.LETTERS[:5]]
    extra += [f"<think> x </think>\n{a}" for a in answers]
    return list(corpus) + extra * 20 + answers * 50


def build_tiny_vlm(corpus: Sequence[str], seed: int = 0, *, arch: str = "qwen2_vl", hidden_size: int = 128,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None,
                   vision_depth: int = 2, vision_dim: int = 64, vision_heads: int = 4, image_size: int = 112,
                   vocab_size: int = 2048, rope_theta: float = 1e4) -> VLM:
    """A small, untrained Qwen2-VL-architecture model (the real transformers class) for CPU work.

    ``corpus``: texts the byte-level BPE tokenizer is trained on (the benchmark's questions,
    options and rationales; the prompt templates, tags and answer blocks are added). The tokenizer
    uses Qwen2's pre-tokenizer regex, Qwen2-VL's special tokens and a trimmed official chat
    template. ``arch``: "qwen2_vl" or "qwen2_5_vl". Deterministic for a ``seed`` and corpus (the
    caller's global RNG is left untouched). ``image_size`` is recorded as the model's image side.
    ``rope_theta``: the language model's rotary base; M-RoPE gives the width section the lowest
    frequencies, so at 1e4 and a head size of 32 the language model barely tells image columns apart
    (docs/tiny_model_learnability.md, ninth round, measured 10 and 100: no gain).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as IP

    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28, got {image_size}")
    if hidden_size % heads or (hidden_size // heads) % 8:
        raise ValueError(f"hidden_size/heads must be a multiple of 8, got {hidden_size}/{heads}")
    tok = _train_tokenizer(_tokenizer_corpus(corpus), vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // heads
    mrope = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope})
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=vision_heads,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim,
                      num_heads=vision_heads, out_hidden_size=hidden_size, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
    else:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")
    config = Config(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_TOKEN],
                    video_token_id=ids[VIDEO_TOKEN], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(arch)(config)
    model.eval()
    ip = IP(size={"shortest_edge": 56 * 56, "longest_edge": max(28 * 28 * 1280, image_size * image_size)})
    vlm = VLM(model, image_only_processor(ip, tok, CHAT_TEMPLATE), arch=arch, image_size=image_size)
    vlm.letter_token_ids()  # fail early if the answer letters are not single tokens
    return vlm


# ---------------------------------------------------------------------- loading


def _read_chat_template(path: Path, tokenizer) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _check_checkpoint(path: Path) -> str:
    """The checkpoint's arch, or a clear error on anything else."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    files = sorted(p.name for p in path.iterdir())
    cfg_file = path / "config.json"
    if not cfg_file.is_file() and (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} holds a PEFT LoRA adapter, not a model: load it with "
                         f"load_vlm(<base model dir>, lora={str(path)!r})")
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a supported checkpoint: no config.json (found: {files or 'nothing'})")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if model_type not in ARCHS:
        raise ValueError(f"{path}: config.json model_type is {model_type!r}; supported: {ARCHS}")
    if not any(name.endswith(".safetensors") for name in files):
        other = [n for n in files if re.search(r"\.(bin|pt|pth|ckpt)$", n)]
        raise ValueError(f"{path}: no .safetensors weights (found {other or files}); only safetensors "
                         f"checkpoints are loaded (pickled .bin/.pt weights are refused)")
    return model_type


def load_vlm(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
             lora: dict | str | Path | None = None, image_size: int | None = None) -> VLM:
    """Load what ``VLM.save`` wrote, or a real Qwen2-VL / Qwen2.5-VL checkpoint directory.

    Requires ``config.json`` with model_type "qwen2_vl" or "qwen2_5_vl" and safetensors weights;
    never runs remote code. The processor is built explicitly (tokenizer + the PIL image processor
    from the directory's image-processor config + chat template), never via ``AutoProcessor``.
    ``dtype``: e.g. torch.float32 / "bfloat16" (default: the checkpoint's). ``lora``: a dict of
    ``peft.LoraConfig`` arguments to attach a new adapter, or the path of a saved adapter.
    ``image_size`` overrides the saved side (real checkpoints have none recorded).
    ``device``: default ``$SAFEMED_DEVICE`` (the profile's ``device``, which ``safemed_lib.reproduce``
    exports to the notebooks' kernels: "cuda" on the paper profile), else where the weights load (CPU).
    """
    import os

    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    arch = _check_checkpoint(path)
    settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    ip_files = [f for f in ("preprocessor_config.json", "processor_config.json") if (path / f).is_file()]
    if not ip_files:
        raise ValueError(f"{path}: no preprocessor_config.json / processor_config.json (image processor settings)")
    ip = Qwen2VLImageProcessorPil(**_image_processor_kwargs(path / ip_files[0]))
    processor = image_only_processor(ip, tokenizer, _read_chat_template(path, tokenizer) or CHAT_TEMPLATE)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _model_class(arch).from_pretrained(path, dtype=dtype or "auto", use_safetensors=True,
                                                trust_remote_code=False)
    model.eval()
    device = device or os.environ.get("SAFEMED_DEVICE") or None
    if device is not None:
        model.to(device)
    vlm = VLM(model, processor, arch=arch, image_size=image_size or settings.get("image_size"))
    if isinstance(lora, dict):
        vlm.add_lora(**lora)
    elif lora is not None:
        from peft import PeftModel

        vlm.model = PeftModel.from_pretrained(vlm.model, str(lora), is_trainable=False)
    return vlm


_IP_KEYS = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
            "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "rescale_factor",
            "do_convert_rgb", "resample")


def _image_processor_kwargs(cfg_file: Path) -> dict:
    """The PIL image processor's settings from a (pre)processor config, whichever class wrote it."""
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("image_processor", cfg)  # processor_config.json nests it
    kwargs = {k: cfg[k] for k in _IP_KEYS if k in cfg}
    size = kwargs.get("size")
    if isinstance(size, dict) and not {"shortest_edge", "longest_edge"} <= set(size):
        kwargs.pop("size")  # e.g. {"min_pixels":..., "max_pixels":...} from old configs
        kwargs.setdefault("min_pixels", size.get("min_pixels", 56 * 56))
        kwargs.setdefault("max_pixels", size.get("max_pixels", 28 * 28 * 1280))
    return kwargs
