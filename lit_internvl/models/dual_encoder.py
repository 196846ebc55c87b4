"""DualEncoder: an image tower and a text tower meeting in one normalised embedding space (CLIP / InternVL-C)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DualEncoder(nn.Module):
    """Image encoder + pooling + projection beside text encoder + projection, and a learnable temperature.

    ``image_encoder``: ``(N, 3, H, W) → (N, L, C)`` (cls token first); ``text_encoder``:
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
        if image_pooling not in ("cls", "mean"):
            raise ValueError(f"Unknown image_pooling {image_pooling!r}; choose 'cls' or 'mean'")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_pooling = image_pooling
        self.image_projection = nn.Linear(image_encoder.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` → unit vectors ``(N, embed_dim)``."""
        features = self.image_encoder(pixel_values)
        pooled = features[:, 0] if self.image_pooling == "cls" else features[:, 1:].mean(dim=1)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T)`` token ids → unit vectors ``(N, embed_dim)``."""
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ image embeddings, text embeddings, and the logit scale ``exp(logit_scale)``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()
