"""``OptionScorer``: the answer-only fast path for one question asked of many versions of its image.

Certifying an answer-only model scores one question thousands of times with noisy copies of one
image (``certify.logprob_classifier``). ``VLM.option_logprobs`` redoes everything for every copy:
the prompt's tokens and 3-D positions, the text before the image, the patch embedding as a 3-D
convolution over a frame repeated in time, the vision attention one image at a time, and every
decoder layer at every position although only the last position's logits are read. The scorer
does only what depends on the pixels, once per question:

* the text before the image through the language model once (its keys and values are reused);
  the positions, the rotary tables, the causal mask and the text embeddings after it are fixed;
* the patch embedding as one matrix product, with the CLIP normalization and the repeated frame
  folded into the matrix; the vision attention batched over the images (same grid: equal blocks);
* the last decoder layer computes keys and values for every position but its query, attention
  output and MLP for the last position only.

``logprobs(images)`` equals ``VLM.option_logprobs(images, [item] * B, prompt)`` to float rounding
(tested). ``counts(x, num, sigma=...)`` is smoothing's sampler (``smoothing.sample_counts``) with the
noise drawn where it first meets the model: the patch embedding is linear, so the embedding of
x + d with d ~ N(0, sigma^2 I) in pixel space is E(x) + e with e ~ N(0, sigma^2 W W^T) per patch
(W: the folded embedding matrix, 588 pixels -> embed_dim); drawing e directly gives the same
distribution of the base classifier's outputs, so CERTIFY's guarantee (Cohen et al. 2019) holds
unchanged, with embed_dim instead of 588 normal draws per patch. Noisy pixels are not clamped
(as in ``smoothing``). The fast path covers the Qwen2-VL vision tower and Qwen2 decoder layers
without sliding windows; ``supported(vlm)`` says whether a model qualifies (others use
``option_logprobs`` and pixel noise).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import prompts
from .processor import IMAGE_TOKEN

_VISION = {"Qwen2VisionTransformerPretrainedModel"}
_DECODER = {"Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer"}


def supported(vlm) -> bool:
    """Whether ``OptionScorer`` can run ``vlm`` (Qwen2-VL vision tower, Qwen2 decoder layers, no sliding window)."""
    try:
        m = vlm.model.model
        layers, text = m.language_model.layers, m.language_model.config
        vision = type(m.visual).__name__
    except AttributeError:
        return False
    return (vision in _VISION and all(type(layer).__name__ in _DECODER for layer in layers)
            and not getattr(text, "use_sliding_window", False))


class OptionScorer:
    """Option-letter log-probabilities of one question for many versions of its image (see the module docstring)."""

    def __init__(self, vlm, item, prompt: str = "nothink", image_size: int | tuple[int, int] | None = None):
        if not supported(vlm):
            raise ValueError(f"OptionScorer supports the Qwen2-VL vision tower and Qwen2 decoder layers without a "
                             f"sliding window; {vlm!r} is not one (use VLM.option_logprobs)")
        from transformers.vision_utils import get_vision_position_ids

        self.vlm, self.item, self.prompt = vlm, item, prompt  # image_size: side, or (H, W); default the VLM's
        m = vlm.model.model
        self.visual, self.lm = m.visual, m.language_model
        size = image_size or vlm.image_size
        if size is None:
            raise ValueError("OptionScorer needs the image size (image_size=, or a VLM loaded with one)")
        h, w = (size, size) if isinstance(size, int) else size
        dev, dtype = vlm.device, vlm.model.dtype
        prefix = vlm.tokenizer(prompts.ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        inputs, _ = vlm._encode(torch.zeros(1, 3, h, w, device=dev), [item], prompt, [prefix])
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        image = (ids[0] == vlm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).nonzero().flatten()
        self.p0, self.n_image_tokens = int(image[0]), len(image)
        if int(image[-1]) + 1 - self.p0 != self.n_image_tokens:
            raise ValueError("OptionScorer: the prompt's image tokens are not contiguous")
        self.letters = vlm.letter_token_ids(len(item.options))
        with torch.no_grad():
            pos = m.compute_3d_position_ids(input_ids=ids, image_grid_thw=grid, video_grid_thw=None, inputs_embeds=None,
                                            attention_mask=inputs["attention_mask"], past_key_values=None,
                                            mm_token_type_ids=inputs["mm_token_type_ids"])
            emb = self.lm.embed_tokens(ids)
            self.text = emb[:, self.p0:]                                   # (1, T, hidden): text after the prefix
            self.prefix_kv = self._prefix(emb[:, :self.p0], pos[..., :self.p0])
            self.rope = self.lm.rotary_emb(self.text, pos[..., self.p0:])  # cos, sin (1, T, head_dim)
            T, P, n = self.text.shape[1], self.p0, self.n_image_tokens
            layer0 = self.lm.layers[0]
            cos, sin = self.rope
            self.text_qkv = self._qkv(layer0.self_attn, layer0.input_layernorm(self.text[:, n:]), cos[:, n:], sin[:, n:])
            self.mask = torch.ones(T, P + T, dtype=torch.bool, device=dev)
            self.mask[:, P:] = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            # patch embedding: pixels in [0, 1] of one frame -> embed_dim, normalization folded in
            proj = self.visual.patch_embed.proj.weight.float()             # (E, C, t, ps, ps)
            w = proj.sum(2)                                                # the frame is repeated in time
            mean, std = vlm._mean.to(w).view(1, -1, 1, 1), vlm._std.to(w).view(1, -1, 1, 1)
            self.w = (w / std).reshape(w.shape[0], -1)                     # (E, C*ps*ps)
            self.b = -(w * (mean / std)).sum((1, 2, 3))
            self.n_patches, self.grid_hw = int(grid.prod()), (int(grid[0, 1]), int(grid[0, 2]))
            cos, sin = self.visual.rotary_pos_emb(torch.zeros(self.n_patches, 1, device=dev),
                                                  get_vision_position_ids(grid, self.visual.spatial_merge_size, kwargs={}))
            self.vrope = (cos.to(dtype), sin.to(dtype))
            self.w, self.b = self.w.to(dtype), self.b.to(dtype)
            self._chol, self._vrope_b = {}, {}

    def _prefix(self, emb, pos):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        self.lm(inputs_embeds=emb, position_ids=pos, past_key_values=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    # ----------------------------------------------------------------- the pipeline
    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B * patches, 3*14*14) rows in the processor's merge-window order."""
        v = self.vlm
        B, C, H, W = images.shape
        ps, mg = v.patch_size, v.merge_size
        gh, gw = H // ps, W // ps
        if (gh, gw) != self.grid_hw:
            raise ValueError(f"OptionScorer was built for a {self.grid_hw[0]}x{self.grid_hw[1]} grid of patches per "
                             f"image, got a {H}x{W} image ({gh}x{gw})")
        p = images.reshape(B, C, gh // mg, mg, ps, gw // mg, mg, ps).permute(0, 2, 5, 3, 6, 1, 4, 7)
        return p.reshape(B * gh * gw, C * ps * ps).to(self.w.dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The patch embeddings (B * patches, embed_dim) of pixel images (what the vision tower's first layer gives)."""
        return F.linear(self.patches(images), self.w, self.b)

    def from_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """(B * patches, embed_dim) patch embeddings -> (B, n_options) option log-probabilities (float32)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        n = self.n_patches
        B = h.shape[0] // n
        if B not in self._vrope_b:  # the rotary tables of B images, built once per batch size
            self._vrope_b = {B: tuple(t.repeat(B, 1) for t in self.vrope)}
        cos, sin = self._vrope_b[B]
        for blk in self.visual.blocks:
            a = blk.attn
            q, k, v = a.qkv(blk.norm1(h)).reshape(h.shape[0], 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.view(B, n, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scaling)   # one image per row: the blocks are equal
            h = h + a.proj(o.transpose(1, 2).reshape(h.shape[0], -1))
            h = h + blk.mlp(blk.norm2(h))
        x = self.text.expand(B, -1, -1).clone()
        x[:, :self.n_image_tokens] = self.visual.merger(h).view(B, self.n_image_tokens, -1).to(x.dtype)
        logits = self.vlm.model.lm_head(self._decode(x))
        return torch.log_softmax(logits.float(), -1)[:, self.letters]

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder over the positions after the prefix; the final-norm hidden state at the last one (B, hidden)."""
        B, T, _ = h.shape
        cos, sin = self.rope
        layers = self.lm.layers
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1          # only the last position's output is read
            a = layer.self_attn
            x = layer.input_layernorm(h)
            pk, pv = self.prefix_kv[i]
            if i == 0 and not last:  # the text's queries, keys and values do not depend on the image
                q, k, v = self._qkv(a, x[:, :self.n_image_tokens], cos[:, :self.n_image_tokens],
                                    sin[:, :self.n_image_tokens])
                tq, tk, tv = (t.expand(B, -1, -1, -1) for t in self.text_qkv)
                q, k, v = torch.cat([q, tq], 2), torch.cat([pk.expand(B, -1, -1, -1), k, tk], 2), \
                    torch.cat([pv.expand(B, -1, -1, -1), v, tv], 2)
                xq = x
            else:
                q, k, v = self._qkv(a, x, cos, sin)
                xq = x[:, -1:] if last else x
                if last:
                    q = q[:, :, -1:]
                k, v = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if last else self.mask, scale=a.scaling,
                                               enable_gqa=k.shape[1] != q.shape[1])
            h = (h[:, -1:] if last else h) + a.o_proj(o.transpose(1, 2).reshape(B, xq.shape[1], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.norm(h[:, -1])

    @staticmethod
    def _qkv(a, x, cos, sin):
        """Rotated queries, keys and values (B, heads, T, head_dim) of attention ``a`` on ``x``."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def logprobs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] (not clamped) -> (B, n_options) option log-probabilities;
        ``VLM.option_logprobs`` to float rounding. Follows the caller's grad mode."""
        return self.from_embeddings(self.embed(images))

    # ----------------------------------------------------------------- smoothing
    def noise_factor(self, sigma: float) -> torch.Tensor:
        """L with L L^T = sigma^2 W W^T: pixel noise N(0, sigma^2 I) of one patch, seen by the patch embedding."""
        if sigma not in self._chol:
            cov = (self.w.double() @ self.w.double().T)
            vals, vecs = torch.linalg.eigh(cov)             # symmetric square root: fine if W W^T is singular
            self._chol[sigma] = (sigma * vecs * vals.clamp(min=0).sqrt()).to(self.w.dtype)
        return self._chol[sigma]

    def noisy_logprobs(self, x: torch.Tensor, num: int, *, sigma: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(num, n_options) log-probabilities of x + N(0, sigma^2 I), the noise drawn in the patch embedding."""
        e0 = self.embed(x.unsqueeze(0))                      # (patches, E)
        z = torch.randn(num * e0.shape[0], e0.shape[1], generator=generator, device=e0.device, dtype=e0.dtype)
        return self.from_embeddings(e0.repeat(num, 1) + z @ self.noise_factor(float(sigma)).T)

    @torch.inference_mode()
    def counts(self, x: torch.Tensor, num: int, *, sigma: float, batch_size: int, num_classes: int,
               generator: torch.Generator | None = None) -> np.ndarray:
        """Counts of the argmax option over ``num`` draws of x + N(0, sigma^2 I) (``smoothing.sample_counts``'
        contract), the noise drawn in the patch embedding (same distribution of outputs; module docstring)."""
        out = np.zeros(num_classes, dtype=np.int64)
        for start in range(0, num, batch_size):
            ids = self.noisy_logprobs(x, min(batch_size, num - start), sigma=sigma, generator=generator).argmax(-1)
            out += torch.bincount(ids.cpu(), minlength=num_classes).numpy()
        return out
