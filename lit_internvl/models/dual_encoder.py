"""DualEncoder: an image tower and a text tower meeting in one normalised embedding space (CLIP / InternVL-C),
and InternVL's attention pool, which both InternVL-C (``clip_projector``) and InternVL-G (``clip_projector2``) use."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import attention

ImagePooling = Literal["cls", "mean", "attention"]


class PoolingAttention(nn.Module):
    """The cross-attention of InternVL's attention pool (``CrossAttention`` in OpenGVLab/InternVL
    ``internvl_g/internvl/model/internvl_stage2/modeling_internvl.py``, built with ``qkv_bias=True``): bias-free
    ``q``/``k``/``v`` maps plus separate ``q_bias``/``k_bias``/``v_bias`` vectors (zeros at start), softmax
    scaled by ``head_dim ** -0.5``, and an output projection ``proj`` to ``out_dim``. The names are the
    reference's, so released InternVL-C/-G weights load by name."""

    def __init__(self, dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"the attention pool's width {dim} is not divisible by attn_pool_heads {num_heads}: set "
                f"model.init_args.attn_pool_heads to a divisor of {dim}"
            )
        self.num_heads = num_heads
        self.attn_backend = "sdpa"  # set with the rest of the model by set_attention_backend
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.proj = nn.Linear(dim, out_dim)
        # Deliberate difference: the reference starts q_bias and v_bias at zero (its stage 2 always loads InternVL-C's
        # trained ones); trained from scratch, they start as nn.Linear's biases do, uniform in ±1/√dim: zero biases
        # cost the embedded default's stage 1 R@1 0.48/0.66 → 0.39/0.58 (BENCHMARKS.md). k_bias stays at zero: a
        # key bias shifts every score of a query alike and never changes the softmax.
        bound = 1 / math.sqrt(dim)
        with torch.no_grad():
            self.q_bias.uniform_(-bound, bound)
            self.v_bias.uniform_(-bound, bound)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query (N, Q, C)``, ``key``/``value (N, L, C)`` → ``(N, Q, out_dim)``."""
        n, width = query.shape[0], query.shape[-1]
        heads = lambda x: x.view(n, -1, self.num_heads, width // self.num_heads).transpose(1, 2)  # noqa: E731
        q = heads(F.linear(query, self.q.weight, self.q_bias))
        k = heads(F.linear(key, self.k.weight, self.k_bias))
        v = heads(F.linear(value, self.v.weight, self.v_bias))
        out = attention(q, k, v, backend=self.attn_backend)  # (N, H, Q, C/H)
        return self.proj(out.transpose(1, 2).reshape(n, -1, width))


class AttentionPool(nn.Module):
    """Tokens ``(N, L, C)`` → one vector ``(N, out_dim)``: the mean token queries every token
    (``AttentionPoolingBlock`` of the reference, same file): LayerNorms (eps 1e-5) on query, keys and values,
    then :class:`PoolingAttention`. InternVL-C pools the vision features with it (``clip_projector``, 16 heads),
    InternVL-G the query outputs of QLLaMA (``clip_projector2``)."""

    pooling = "attention"

    def __init__(self, dim: int, out_dim: int, num_heads: int = 16) -> None:
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.cross_attn = PoolingAttention(dim, out_dim, num_heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.norm1_q(tokens.mean(dim=1, keepdim=True))
        return self.cross_attn(query, self.norm1_k(tokens), self.norm1_v(tokens)).squeeze(1)


class TokenProjection(nn.Module):
    """Vision features ``(N, 1+P, C)`` (cls first) → ``(N, E)``: the cls token (``"cls"``, CLIP) or the mean of
    the patches (``"mean"``), then a linear map without bias."""

    def __init__(self, hidden_size: int, embed_dim: int, pooling: Literal["cls", "mean"]) -> None:
        super().__init__()
        self.pooling = pooling
        self.proj = nn.Linear(hidden_size, embed_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features[:, 0] if self.pooling == "cls" else features[:, 1:].mean(dim=1))


def image_projection(hidden_size: int, embed_dim: int, pooling: ImagePooling = "cls", num_heads: int = 16) -> nn.Module:
    """The module that takes vision features ``(N, 1+P, C)`` to the (unnormalised) image embedding ``(N, E)``:
    :class:`TokenProjection` for ``"cls"``/``"mean"``, InternVL-C's :class:`AttentionPool` (``num_heads``
    heads) for ``"attention"`` (README and BENCHMARKS.md compare them on the embedded default)."""
    if pooling not in get_args(ImagePooling):
        raise ValueError(f"Unknown image_pooling {pooling!r}; choose one of {get_args(ImagePooling)}")
    if pooling == "attention":
        return AttentionPool(hidden_size, embed_dim, num_heads)
    return TokenProjection(hidden_size, embed_dim, pooling)


class DualEncoder(nn.Module):
    """Image encoder + pooling + projection beside text encoder + projection, and a learnable temperature.

    ``vision``: ``(N, 3, H, W) → (N, L, C)`` (cls token first), pooled and projected by
    :func:`image_projection` (``image_pooling``; ``attn_pool_heads`` heads for InternVL-C's attention pool,
    16 in the reference); ``text_encoder``:
    ``(input_ids, attention_mask) → (N, C')``. Both are projected to ``embed_dim`` and L2-normalised.
    """

    def __init__(
        self,
        vision: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int = 128,
        image_pooling: ImagePooling = "cls",
        init_logit_scale: float = math.log(1 / 0.07),
        attn_pool_heads: int = 16,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.text_encoder = text_encoder
        self.image_projection = image_projection(vision.hidden_size, embed_dim, image_pooling, attn_pool_heads)
        self.text_projection = nn.Linear(text_encoder.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` → unit vectors ``(N, embed_dim)``."""
        return F.normalize(self.image_projection(self.vision(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T)`` token ids → unit vectors ``(N, embed_dim)``."""
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ image embeddings, text embeddings, and the logit scale ``exp(logit_scale)``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()
