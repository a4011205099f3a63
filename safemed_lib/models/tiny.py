"""The tiny model: a small untrained Qwen2-VL with a byte-level BPE tokenizer trained locally, for CPU work.

``build_tiny_vlm``: the real ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL) class with a small
config; its tokenizer uses Qwen2's pre-tokenizer regex, Qwen2-VL's special tokens and a trimmed
official chat template.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import prompts
from .processor import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, VIDEO_TOKEN, image_only_processor
from .vlm import ARCHS, VLM, _model_class

# Qwen2's pre-tokenizer regex, so the tiny tokenizer splits text like the real one does.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


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
    (docs/lab_notes.md, What the tiny model needs to read the image; measured 10 and 100: no gain).
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
