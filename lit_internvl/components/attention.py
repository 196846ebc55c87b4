"""The one attention function of lit_internvl, with interchangeable backends.

Every module that attends (vision encoder, decoder, text encoder, cross-attention) calls
:func:`attention`. The backends compute the same numbers on the same inputs:

- ``sdpa``  (default): ``torch.nn.functional.scaled_dot_product_attention``; picks flash or
  memory-efficient kernels where the device has them.
- ``eager``: the textbook softmax(q·kᵀ/√d)·v in float32, the reference the others are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    Args:
        q: ``(B, H, Tq, D)`` queries.
        k, v: ``(B, Hkv, Tk, D)`` keys and values; ``H`` must be a multiple of ``Hkv`` (GQA).
        mask: boolean, broadcastable to ``(B, H, Tq, Tk)``; True where a query may attend.
            Combined with ``is_causal`` when both are given.
        is_causal: hide keys that come after the query (for ``Tq == Tk``; with a KV cache the
            queries are the last ``Tq`` positions of ``Tk``).
        backend: one of :data:`BACKENDS`.

    Returns:
        ``(B, H, Tq, D)``. A query whose every key is masked gets zeros.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads")
    if num_heads != num_kv_heads:
        repeat = num_heads // num_kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if is_causal and mask is None and backend == "sdpa" and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets flash kernels run
    if is_causal:
        causal = causal_mask(q.shape[2], k.shape[2], q.device)
        mask = causal if mask is None else mask & causal
    row_has_keys = None
    if mask is not None:
        # A fully masked row (a padding query) has no defined softmax: let it attend anywhere so
        # that every kernel stays finite in both directions, then zero its output.
        row_has_keys = mask.any(dim=-1, keepdim=True)
        mask = mask | ~row_has_keys
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = _eager(q, k, v, mask)
    if row_has_keys is not None:
        out = out.masked_fill(~row_has_keys, 0.0)
    return out


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ v.float()).to(q.dtype)


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """``(Tq, Tk)`` boolean mask; query i (the ``Tk - Tq + i``-th position) sees keys up to itself."""
    offset = num_keys - num_queries
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=offset)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` 1/0 key-validity mask → ``(B, 1, 1, T)`` boolean mask for :func:`attention`."""
    return attention_mask.bool()[:, None, None, :]
