"""DualEncoder: an image tower and a text tower meeting in one normalised embedding space (CLIP / InternVL-C)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import attention

ImagePooling = Literal["cls", "mean", "attention"]


class ImageProjection(nn.Module):
    """Vision features ``(N, 1+P, C)`` (cls first) → the image embedding ``(N, E)``, not yet normalised.

    ``pooling``: ``"cls"`` (CLIP) or ``"mean"`` of the patches, each followed by a linear map; or
    ``"attention"``, InternVL-C's ``clip_projector``: the mean of all tokens queries all tokens in one
    multi-head cross-attention (LayerNorm on query, keys and values), whose output projection lands in
    the embedding space (README and BENCHMARKS.md compare the three on the embedded default).
    """

    def __init__(self, hidden_size: int, embed_dim: int, pooling: ImagePooling = "cls", num_heads: int = 4) -> None:
        super().__init__()
        if pooling not in get_args(ImagePooling):
            raise ValueError(f"Unknown image_pooling {pooling!r}; choose one of {get_args(ImagePooling)}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.pooling, self.num_heads = pooling, num_heads
        self.attn_backend = "sdpa"  # set with the rest of the model by set_attention_backend
        if pooling == "attention":
            self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(hidden_size) for _ in range(3))
            self.q = nn.Linear(hidden_size, hidden_size)
            self.k = nn.Linear(hidden_size, hidden_size, bias=False)  # a key bias shifts every score alike
            self.v = nn.Linear(hidden_size, hidden_size)
            self.proj = nn.Linear(hidden_size, embed_dim)
        else:
            self.proj = nn.Linear(hidden_size, embed_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return self.proj(features[:, 0])
        if self.pooling == "mean":
            return self.proj(features[:, 1:].mean(dim=1))
        n, _, width = features.shape
        heads = lambda x: x.view(n, -1, self.num_heads, width // self.num_heads).transpose(1, 2)  # noqa: E731
        q = heads(self.q(self.norm_q(features.mean(dim=1, keepdim=True))))
        k, v = heads(self.k(self.norm_k(features))), heads(self.v(self.norm_v(features)))
        pooled = attention(q, k, v, backend=self.attn_backend)  # (N, H, 1, C/H)
        return self.proj(pooled.transpose(1, 2).reshape(n, width))


class DualEncoder(nn.Module):
    """Image encoder + pooling + projection beside text encoder + projection, and a learnable temperature.

    ``vision``: ``(N, 3, H, W) → (N, L, C)`` (cls token first), pooled and projected by
    :class:`ImageProjection` (``image_pooling``); ``text_encoder``:
    ``(input_ids, attention_mask) → (N, C')``. Both are projected to ``embed_dim`` and L2-normalised.
    """

    def __init__(
        self,
        vision: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int = 128,
        image_pooling: ImagePooling = "cls",
        init_logit_scale: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__()
        self.vision = vision
        self.text_encoder = text_encoder
        self.image_projection = ImageProjection(vision.hidden_size, embed_dim, image_pooling)
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
