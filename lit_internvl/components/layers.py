"""Small layers shared by the encoders and decoders: RMSNorm, stochastic depth, and linear maps of one input fused."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as LLaMA, Qwen2 and InternViT-6B do)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


NormType = Literal["layer_norm", "rms_norm"]


def make_norm(kind: NormType, dim: int, eps: float) -> nn.Module:
    """``"layer_norm"`` or ``"rms_norm"``: the two norms of the InternViT family."""
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms_norm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"Unknown norm_type {kind!r}; choose 'layer_norm' or 'rms_norm'")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def fused_linear(x: torch.Tensor, layers: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """The outputs of several linear maps of the same input by one matmul over their stacked weights.

    One GEMM ``N = Σ out_features`` wide instead of several narrow ones (the key and value maps of grouped-query
    attention are 128 wide in InternVL3-1B; gate and up are two of the same shape), while the weights stay stored
    apart, under the published checkpoints' names, so loading, exporting and LoRA targets do not change. The stacked
    weight is a copy made each forward (autocast casts one anyway); layers that are not plain ``nn.Linear`` (a LoRA
    wrapper) or that disagree about biases run one by one.
    """
    plain = all(type(layer) is nn.Linear for layer in layers)
    biases = [layer.bias for layer in layers] if plain else []
    if not plain or (any(b is None for b in biases) and not all(b is None for b in biases)):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
