"""Rotary position embeddings (RoPE) over float positions, optionally with YaRN scaling.

Positions are float32 tensors end to end so that fractional positions (V2PE gives image tokens
increments of 1/stride) are not rounded: the angles are ``outer(position, inv_freq)``.
The rotation is the "rotate half" layout of LLaMA/Qwen2 checkpoints in transformers.

YaRN (GPT-OSS; arXiv 2309.00071, transformers' ``modeling_rope_utils._compute_yarn_parameters``) keeps the fast
frequencies (more than ``beta_fast`` turns over the original context), divides the slow ones (fewer than
``beta_slow`` turns) by ``factor``, blends linearly in between, and scales cos and sin by the attention factor
``0.1·ln(factor) + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn


@dataclass
class RopeScaling:
    """YaRN rotary scaling, with the fields of transformers' ``rope_parameters`` of type ``"yarn"``."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # round the blend's bounds outwards to whole dimensions (transformers' default)
    attention_factor: float | None = None  # None: 0.1·ln(factor) + 1 (1 for factor ≤ 1)
    rope_type: Literal["yarn"] = "yarn"

    def __post_init__(self) -> None:
        if self.rope_type != "yarn":
            raise ValueError(f"Unknown rope_type {self.rope_type!r}; lit_internvl scales RoPE by 'yarn' only")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be positive, got {self.factor}")

    @property
    def scale(self) -> float:
        """The factor cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def inv_freq(self, head_dim: int, theta: float) -> torch.Tensor:
        """``(head_dim / 2,)`` inverse frequencies: the plain ones blended with the interpolated ones (computed in
        the order transformers computes them, so that the two agree to the bit)."""
        wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # / 2π
        plain, interpolated = 1.0 / wavelengths, 1.0 / (self.factor * wavelengths)
        context = self.original_max_position_embeddings

        def dimension(turns: float) -> float:  # the dimension whose wavelength fits `turns` times in the context
            return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension(self.beta_fast), dimension(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        kept = 1 - ramp  # 1 for the fast (low) dimensions, which keep their frequency; 0 for the slow ones
        return interpolated * (1 - kept) + plain * kept


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10_000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        if self.scaling is not None:
            return self.scaling.inv_freq(self.head_dim, self.theta)
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def reset_parameters(self) -> None:
        # Buffers built on the meta device (FSDP) are re-created when the model is materialised.
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``(B, T)`` (any numeric dtype) → cos, sin ``(B, 1, T, head_dim)`` in float32."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        if self.scaling is None:
            return angles.cos(), angles.sin()
        return angles.cos() * self.scaling.scale, angles.sin() * self.scaling.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, head_dim)`` by the angles of :class:`RotaryEmbedding` (computed in float32)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
