"""Connectors: vision features in, language-model tokens out.

Contract (every connector, built-in or a user's own): built as ``Connector(vision_dim, text_dim,
**options)``; ``forward(features (N, 1 + P, vision_dim)) → tokens (N, T, text_dim)`` where the
features are an image encoder's output (cls token first, then a square grid of P patches,
row-major); ``tokens_per_tile(P) → T`` says how many tokens a tile becomes before any image is seen,
so that prompts can reserve ``<IMG_CONTEXT>`` slots.

A connector that can give a tile more than one visual budget (InternVL3.5-Flash: 256 or 64 tokens a 448 px tile)
declares them instead: ``budgets(P) → (T1, T2, …)`` (the first is the default) and
``forward(features, budget=T) → (N, T, text_dim)``. The data reserves each tile's slots at its budget, and one
batch may mix budgets (:class:`~lit_internvl.models.VisionLanguageModel` runs each group of tiles through the
connector at its budget).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.router import VisualResolutionRouter, compress_tiles


def pixel_shuffle(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Fold ``factor × factor`` neighbourhoods into channels: ``(N, H, W, C) → (N, H/f, W/f, f²·C)``.

    Output cell (i, j) concatenates input cells (f·i + a, f·j + b) for a, b in row-major order; with
    f = 2 that is (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1): InternVL's "v2" pixel shuffle.
    """
    n, height, width, channels = grid.shape
    if height % factor or width % factor:
        raise ValueError(f"A {height}×{width} patch grid cannot be pixel-shuffled by {factor}")
    grid = grid.view(n, height // factor, factor, width // factor, factor, channels)
    grid = grid.permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, height // factor, width // factor, factor * factor * channels)


def _patch_grid(features: torch.Tensor) -> torch.Tensor:
    """Drop the cls token and lay the patches out as a square grid ``(N, side, side, C)``."""
    patches = features[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"Expected a square patch grid after the cls token, got {patches.shape[1]} patches")
    return patches.reshape(patches.shape[0], side, side, patches.shape[2])


def shuffle_factor(downsample_ratio: float) -> int:
    """k of a pixel shuffle whose ``downsample_ratio`` is 1/k: each k×k block of patches becomes one token."""
    factor = round(1 / downsample_ratio)
    if abs(factor * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {downsample_ratio}")
    return factor


class PixelShuffleMLP(nn.Module):
    """InternVL 1.5–3's projector ("mlp1"): pixel shuffle → LayerNorm → Linear → GELU → Linear.

    With ``downsample_ratio`` 0.5 a 448 px tile (32×32 patches) becomes 256 tokens.
    """

    def __init__(self, vision_dim: int, text_dim: int, downsample_ratio: float = 0.5, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.factor = factor = shuffle_factor(downsample_ratio)
        in_dim = vision_dim * factor * factor
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps)
        self.fc1 = nn.Linear(in_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)

    def tokens_per_tile(self, num_patches: int) -> int:
        return num_patches // (self.factor * self.factor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        grid = pixel_shuffle(_patch_grid(features), self.factor)
        tokens = grid.flatten(1, 2)
        return self.fc2(F.gelu(self.fc1(self.norm(tokens))))


class LinearProjector(nn.Module):
    """One linear map per patch (LLaVA-1 style): a token for every patch, no downsampling."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)

    def tokens_per_tile(self, num_patches: int) -> int:
        return num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(_patch_grid(features).flatten(1, 2))


class MultiBudgetConnector(nn.Module):
    """One :class:`PixelShuffleMLP` per downsample ratio, a tile's budget choosing which: with ratios 0.5 and 0.25
    a 448 px tile becomes 256 or 64 tokens (InternVL3.5-Flash's ``mlp1`` and ``mlp2`` have this shape of choice;
    its released ``mlp2`` is deeper, a later component of its own), a 112 px tile of the tiny tower 16 or 4.

    Args:
        vision_dim, text_dim: as every connector.
        downsample_ratios: one projector each, the first the default budget's.
    """

    def __init__(self, vision_dim: int, text_dim: int, downsample_ratios: tuple[float, ...] = (0.5, 0.25)) -> None:
        super().__init__()
        if len(set(downsample_ratios)) != len(downsample_ratios) or not downsample_ratios:
            raise ValueError(f"downsample_ratios must be distinct, got {downsample_ratios}")
        self.projectors = nn.ModuleList(PixelShuffleMLP(vision_dim, text_dim, ratio) for ratio in downsample_ratios)

    def budgets(self, num_patches: int) -> tuple[int, ...]:
        return tuple(projector.tokens_per_tile(num_patches) for projector in self.projectors)

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        chosen = self.budgets(features.shape[1] - 1).index(_budget(self, features, budget))
        tokens = self.projectors[chosen](features)
        return with_idle(tokens, [projector for i, projector in enumerate(self.projectors) if i != chosen])


def _budget(connector: nn.Module, features: torch.Tensor, budget: int | None) -> int:
    """``budget`` checked against the budgets ``connector`` gives tiles of ``features``' size; None: the first."""
    budgets = connector.budgets(features.shape[1] - 1)
    if budget is None:
        return budgets[0]
    if budget not in budgets:
        raise ValueError(f"this connector gives {budgets} tokens a tile, not {budget}")
    return budget


def with_idle(tokens: torch.Tensor, idle: list[nn.Module]) -> torch.Tensor:
    """``tokens`` with the parameters of the ``idle`` modules (a connector's projectors not used for this budget)
    entering at zero: each then has a (zero) gradient on every step, so DDP finds no unused parameter and FSDP2's
    ranks reduce the same gradients whatever budgets their batch holds."""
    sums = [p.sum() for module in idle for p in module.parameters()]
    return tokens + 0.0 * torch.stack(sums).sum().to(tokens.dtype) if sums else tokens


class FlashMLP(nn.Module):
    """InternVL3.5-Flash's second projector ("mlp2"): pixel shuffle by ``1 / downsample_ratio`` (0.25: a 448 px tile
    becomes 64 tokens) → LayerNorm → Linear(·, 2D) → GELU → Dropout → Linear(2D, 2D) → GELU → Dropout → Linear(2D, D),
    as the Flash checkpoints' remote code builds it (``self.mlp2``; released names ``mlp2.{0,1,4,7}`` are
    ``norm``, ``fc1``, ``fc2``, ``fc3`` here)."""

    def __init__(
        self, vision_dim: int, text_dim: int, downsample_ratio: float = 0.25, dropout: float = 0.1,
        norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.factor = factor = shuffle_factor(downsample_ratio)
        in_dim = vision_dim * factor * factor
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps)
        self.fc1 = nn.Linear(in_dim, 2 * text_dim)
        self.fc2 = nn.Linear(2 * text_dim, 2 * text_dim)
        self.fc3 = nn.Linear(2 * text_dim, text_dim)
        self.dropout = nn.Dropout(dropout)

    def tokens_per_tile(self, num_patches: int) -> int:
        return num_patches // (self.factor * self.factor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = pixel_shuffle(_patch_grid(features), self.factor).flatten(1, 2)
        hidden = self.dropout(F.gelu(self.fc1(self.norm(tokens))))
        return self.fc3(self.dropout(F.gelu(self.fc2(hidden))))


class FlashConnector(nn.Module):
    """InternVL3.5-Flash's connector: ``mlp1`` (:class:`PixelShuffleMLP`, ratio 0.5: 256 tokens a 448 px tile, 16 a
    112 px tile of the tiny tower), ``mlp2`` (:class:`FlashMLP`, ratio 0.25: 64, or 4) and the visual resolution
    router that picks one of them per tile (:class:`~lit_internvl.components.router.VisualResolutionRouter`).

    Budgets ``(T, T/4)``, the first the default; ``forward(features, budget)`` as :class:`MultiBudgetConnector`'s (the
    projector and router left out enter at zero, for DDP and FSDP2). :meth:`compress` is the released decision rule on
    the router's scores (``relative_threshold``, ``absolute_threshold``: the checkpoint config's
    ``flash_relative_threshold`` and ``flash_absolute_threshold``); with ``route`` on, the stages and the inference
    functions let the router pick each tile's budget and shorten the sequence (:mod:`lit_internvl.models.routing`), as
    the released ``generate`` does in ``flash_mode``.

    Args:
        vision_dim, text_dim: as every connector.
        downsample_ratio: ``mlp1``'s (``mlp2``'s is its square, as released).
        relative_threshold, absolute_threshold: the decision rule's quantile and floor (defaults: the values of the
            transformers port's tests, not checked against a release; a Flash folder's own are read from its config).
        route: route tiles given at the first budget (False: every tile as the data gives it).
        router_heads, router_layer_order: the router pooling's heads and layer order
            (:class:`~lit_internvl.components.router.CrossAttentionPooling`).
        norm_eps: ``mlp1``'s and ``mlp2``'s LayerNorm eps.
    """

    def __init__(
        self, vision_dim: int, text_dim: int, downsample_ratio: float = 0.5, relative_threshold: float = 0.1,
        absolute_threshold: float = 0.5, route: bool = True, router_heads: int = 16,
        router_layer_order: tuple[int, ...] = (1, 2, 2, 2), norm_eps: float = 1e-5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.mlp1 = PixelShuffleMLP(vision_dim, text_dim, downsample_ratio, norm_eps)
        self.mlp2 = FlashMLP(vision_dim, text_dim, downsample_ratio**2, norm_eps=norm_eps)
        self.router = VisualResolutionRouter(vision_dim, router_heads, layer_order=tuple(router_layer_order))
        self.relative_threshold, self.absolute_threshold = relative_threshold, absolute_threshold
        self.routing = route

    def budgets(self, num_patches: int) -> tuple[int, ...]:
        return (self.mlp1.tokens_per_tile(num_patches), self.mlp2.tokens_per_tile(num_patches))

    def forward(self, features: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        first = _budget(self, features, budget) == self.budgets(features.shape[1] - 1)[0]
        tokens = (self.mlp1 if first else self.mlp2)(features)
        # The other projector and the router (it runs in scores()) enter at zero, as MultiBudgetConnector's.
        return with_idle(tokens, [self.mlp2 if first else self.mlp1, self.router])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` router probabilities of the tiles' features ``(N, 1 + P, C)`` (class 0: compress)."""
        return self.router.probabilities(features)

    def compress(self, scores: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the tiles the released rule compresses, given the scores of the tiles routed together."""
        return compress_tiles(scores, self.relative_threshold, self.absolute_threshold)
