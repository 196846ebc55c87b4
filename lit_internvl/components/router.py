"""InternVL3.5-Flash's visual resolution router (ViR): a two-way score per tile, and the released decision rule.

::

    features (N, 1 + P, C) ─► drop cls ─► pooling: one learned query attends to the tile's P patches, four times
        (N, C) ─► gating: four residual MLP blocks, LayerNorm, Linear(C, 2) ─► logits (N, 2) ─► softmax
    a tile is compressed when its score p₀ (the probability of class 0) passes both a quantile of the scores of the
    tiles routed together and an absolute floor: p₀ > quantile(p₀, relative) and p₀ ≥ absolute

The layout and the rule follow the Flash checkpoints' remote code (``InternVL3_5-*-Flash/modeling_internvl_chat.py``:
``CrossAttentionPooling``, ``Gating``, ``extract_feature_flash``, ``generate_flash``); the parameter names are its own
(``query_token``, ``attn1``…``attn4`` with ``nn.MultiheadAttention``'s ``in_proj_weight``/``out_proj``, ``norm1``…
``norm4``; ``block1``…``block4`` as ``Sequential(Linear, GELU, Dropout, Linear, Dropout, LayerNorm)``, ``gate`` as
``Sequential(LayerNorm, Linear)``), so a released state loads by name.

The released pooling runs ``attn1``/``norm1`` once and then ``attn2``/``norm2`` three times: ``attn3``, ``norm3``,
``attn4`` and ``norm4`` are in every checkpoint but never used. :class:`CrossAttentionPooling` keeps all four layers
(they load and export as released) and runs them in the order ``layer_order`` names, default ``(1, 2, 2, 2)``, the
released behaviour; ``(1, 2, 3, 4)`` uses each once (as the transformers port of the Flash models,
``InternvlFlashCrossAttentionPooling``, does). Layers the order leaves out enter the output at zero, so that they
have a (zero) gradient and data-parallel training finds no unused parameter.

Class 0 is "compress": the released rule reads ``gate[:, 0]``, and ViCO's router labels are 0 where compressing a
tile costs little (:class:`~lit_internvl.stages.vico.ViRStage`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import attention

#: The class of the router's two-way head that means "compress the tile" (the released rule reads ``gate[:, 0]``).
COMPRESS = 0


class PoolingAttention(nn.Module):
    """Multi-head attention from a few queries to a tile's patches, with ``nn.MultiheadAttention``'s parameters
    (``in_proj_weight`` ``(3C, C)`` holding the q, k, v maps, ``in_proj_bias``, ``out_proj``) and its
    initialisation, computed by :func:`~lit_internvl.components.attention.attention`; no dropout (the released
    layers' is 0)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"router pooling: {dim} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.attn_backend = "sdpa"
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """query ``(N, Q, C)``, tokens ``(N, P, C)`` → ``(N, Q, C)``."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        n, length, dim = tokens.shape
        q = F.linear(query, wq, bq).view(n, query.shape[1], self.num_heads, -1).transpose(1, 2)
        k = F.linear(tokens, wk, bk).view(n, length, self.num_heads, -1).transpose(1, 2)
        v = F.linear(tokens, wv, bv).view(n, length, self.num_heads, -1).transpose(1, 2)
        out = attention(q, k, v, backend=self.attn_backend)  # (N, H, Q, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(n, query.shape[1], dim))


class CrossAttentionPooling(nn.Module):
    """One learned query (``query_token`` ``(1, C)``) pools a tile's patches ``(N, P, C)`` → ``(N, C)``: four
    attention steps, each the previous step's output (normalised by that step's LayerNorm) attending to the patches,
    through the layers ``layer_order`` names (1-based; module docstring). No residual connection, as released."""

    def __init__(self, dim: int, num_heads: int = 16, layer_order: tuple[int, ...] = (1, 2, 2, 2)) -> None:
        super().__init__()
        if not layer_order or any(i not in (1, 2, 3, 4) for i in layer_order):
            raise ValueError(f"layer_order names the pooling layers 1 to 4, got {tuple(layer_order)}")
        self.layer_order = tuple(layer_order)
        self.query_token = nn.Parameter(torch.randn(1, dim))
        for i in (1, 2, 3, 4):
            setattr(self, f"attn{i}", PoolingAttention(dim, num_heads))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(N, P, C)`` (one tile a row, cls dropped) → ``(N, C)``."""
        tokens = tokens.to(self.query_token.dtype)  # the released code pads the tiles in the query's dtype
        out = self.query_token.expand(tokens.shape[0], -1, -1)  # (N, 1, C)
        for i in self.layer_order:
            out = getattr(self, f"norm{i}")(getattr(self, f"attn{i}")(out, tokens))
        idle = [p.sum() for i in {1, 2, 3, 4} - set(self.layer_order) for m in (f"attn{i}", f"norm{i}")
                for p in getattr(self, m).parameters()]  # fmt: skip
        if idle:
            out = out + 0.0 * torch.stack(idle).sum().to(out.dtype)
        return out.squeeze(1)


def _residual_block(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """``Linear → GELU → Dropout → Linear → Dropout → LayerNorm`` (added to its input by :class:`Gating`)."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout),
        nn.LayerNorm(dim),
    )  # fmt: skip


class Gating(nn.Module):
    """Four residual MLP blocks (width ``expansion × C``), then ``LayerNorm → Linear(C, 2)``: ``(N, C)`` → logits
    ``(N, 2)`` (the released module applies the softmax itself; here :meth:`VisualResolutionRouter.probabilities`
    does, and training reads the logits)."""

    def __init__(self, dim: int, expansion: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        for i in (1, 2, 3, 4):
            setattr(self, f"block{i}", _residual_block(dim, expansion * dim, dropout))
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2, 3, 4):
            x = x + getattr(self, f"block{i}")(x)
        return self.gate(x)


class VisualResolutionRouter(nn.Module):
    """ViR: a tile's vision features ``(N, 1 + P, C)`` → logits ``(N, 2)`` of compress (class 0) or keep.

    Args:
        vision_dim: C, the vision encoder's width.
        num_heads: the pooling's attention heads (16 released).
        expansion, dropout: the gating blocks' width factor (4) and dropout (0.1), as released.
        layer_order: :class:`CrossAttentionPooling`'s.
    """

    def __init__(
        self, vision_dim: int, num_heads: int = 16, expansion: int = 4, dropout: float = 0.1,
        layer_order: tuple[int, ...] = (1, 2, 2, 2),
    ) -> None:  # fmt: skip
        super().__init__()
        self.pooling = CrossAttentionPooling(vision_dim, num_heads, layer_order)
        self.gating = Gating(vision_dim, expansion, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features ``(N, 1 + P, C)`` (cls first, as every connector reads them) → logits ``(N, 2)``."""
        return self.gating(self.pooling(features[:, 1:]))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, 2)``: the softmax of the logits, what the released ``Gating`` returns and the rule reads."""
        return self(features).softmax(dim=-1)


def compress_tiles(probabilities: torch.Tensor, relative_threshold: float, absolute_threshold: float) -> torch.Tensor:
    """The released decision rule (``generate_flash``): ``(N, 2)`` router probabilities of the tiles routed together
    → ``(N,)`` bool, True where a tile is compressed: its p₀ exceeds the ``relative_threshold`` quantile of every
    p₀ (computed in float32; strictly greater, so the lowest-scored tile, and a lone tile, is never compressed) and
    reaches ``absolute_threshold``."""
    if not 0.0 <= relative_threshold <= 1.0:
        raise ValueError(f"relative_threshold is a quantile in [0, 1], got {relative_threshold}")
    p = probabilities[:, COMPRESS]
    if p.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=p.device)
    floor = torch.quantile(p.float(), relative_threshold)
    return (p > floor) & (p >= absolute_threshold)
