"""DualEncoder: an image tower and a text tower meeting in one normalised embedding space (CLIP / InternVL-C)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import attention

IMAGE_POOLING = ("cls", "mean", "attention")


class ImageProjection(nn.Module):
    """Vision features ``(N, 1+P, C)`` (cls first) → the image embedding ``(N, E)``, not yet normalised.

    ``pooling``: ``"cls"`` (CLIP) or ``"mean"`` of the patches, each followed by a linear map; or
    ``"attention"``, InternVL-C's ``clip_projector``: the mean of all tokens queries all tokens in one
    multi-head cross-attention (LayerNorm on query, keys and values), whose output projection lands in
    the embedding space. On the embedded default it lifts stage 1's held-out R@1 from 0.49 / 0.67
    (cls) to 0.66 / 0.80 in the same steps.
    """

    def __init__(self, hidden_size: int, embed_dim: int, pooling: str = "cls", num_heads: int = 4) -> None:
        super().__init__()
        if pooling not in IMAGE_POOLING:
            raise ValueError(f"Unknown image_pooling {pooling!r}; choose one of {IMAGE_POOLING}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.pooling, self.num_heads = pooling, num_heads
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
        pooled = attention(q, k, v)  # (N, H, 1, C/H)
        return self.proj(pooled.transpose(1, 2).reshape(n, width))


class DualEncoder(nn.Module):
    """Image encoder + pooling + projection beside text encoder + projection, and a learnable temperature.

    ``image_encoder``: ``(N, 3, H, W) → (N, L, C)`` (cls token first), pooled and projected by
    :class:`ImageProjection` (``image_pooling``); ``text_encoder``:
    ``(input_ids, attention_mask) → (N, C')``. Both are projected to ``embed_dim`` and L2-normalised.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int = 128,
        image_pooling: str = "cls",
        init_logit_scale: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projection = ImageProjection(image_encoder.hidden_size, embed_dim, image_pooling)
        self.text_projection = nn.Linear(text_encoder.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` → unit vectors ``(N, embed_dim)``."""
        return F.normalize(self.image_projection(self.image_encoder(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T)`` token ids → unit vectors ``(N, embed_dim)``."""
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ image embeddings, text embeddings, and the logit scale ``exp(logit_scale)``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()
