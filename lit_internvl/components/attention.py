"""The one attention function of lit_internvl, with interchangeable backends.

Every module that attends (vision encoder, decoder, text encoder, cross-attention) calls
:func:`attention`. The backends compute the same numbers on the same inputs:

- ``sdpa``  (default): ``torch.nn.functional.scaled_dot_product_attention``; picks flash or
  memory-efficient kernels where the device has them.
- ``eager``: the textbook softmax(q·kᵀ/√d)·v in float32, the reference the others are tested against.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention over variable-length documents, torch ≥
  2.10, CUDA only): the documents of packed rows laid end to end with cumulative lengths, no mask at all; without
  documents or padding it is SDPA's own flash path.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block mask (documents of a packed row
  skip each other's blocks entirely); compiled on GPU. No backward on CPU.
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (GPU only; the
  ``gpu`` extra).

Two optional features, for GPT-OSS (transformers' ``gpt_oss/modeling_gpt_oss.py``, ``eager_attention_forward``
and ``GptOssAttention``): learned attention ``sinks``, one logit per head that joins every query's softmax and
takes its share of the weight without a value (``softmax([scores, sink])`` with the sink's column dropped), and a
sliding ``window`` (a query sees the ``window`` latest keys, itself included: ``kv_idx > q_idx - window`` as
transformers' ``sliding_window_overlay``). ``eager`` computes both directly; ``sdpa`` gives the sink to one more
key (zero value) that only the sink's extra query dimension reaches, and puts the window in its boolean mask; ``flex``
rescales its output by the share of the weight the sink leaves (from the log-sum-exp) and has the window in its
block mask. ``varlen`` and ``xformers`` refuse both: their kernels have no sink term, and neither is tested here on
a GPU (:data:`FEATURE_BACKENDS`).

Grouped key/value heads are read in place (``enable_gqa``) by ``sdpa``, ``varlen`` and ``flex``; ``eager`` and
``xformers`` repeat them. Masks are built once per forward pass by :func:`make_mask` in the form the backend wants (a
boolean tensor, a flex ``BlockMask``, an xformers bias) and shared by every layer.

Rows split over a sequence-parallel group come with their mask wrapped in a ``SplitMask``
(:mod:`lit_internvl.components.sequence_parallel`), which exchanges sequence for heads around this same function.

The backend is chosen once per model: every module that attends keeps it in ``attn_backend``
(initially its config's), and :func:`set_attention_backend` changes all of them together; a module
that cannot run a backend lists the ones it can in ``attention_backends`` and refuses the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

Backend = Literal["sdpa", "eager", "flex", "varlen", "xformers"]
BACKENDS: tuple[str, ...] = get_args(Backend)

Feature = Literal["sinks", "sliding_window"]
# The backends that honour each optional feature of attention(); a module that uses a feature names it in its
# ``attention_features``, and the other backends are refused when it is built or switched.
FEATURE_BACKENDS: dict[str, tuple[str, ...]] = {
    "sinks": ("sdpa", "eager", "flex"),
    "sliding_window": ("sdpa", "eager", "flex"),
}
FEATURE_NAMES = {"sinks": "learned attention sinks", "sliding_window": "a sliding window"}


def backends_for(features: tuple[str, ...]) -> tuple[str, ...]:
    """The backends that honour every one of ``features`` (keys of :data:`FEATURE_BACKENDS`)."""
    return tuple(b for b in BACKENDS if all(b in FEATURE_BACKENDS[f] for f in features))


def check_backend(module: nn.Module, backend: str) -> None:
    """Refuse ``backend`` for ``module`` when it is unknown or not among the module's ``attention_backends``,
    naming the features (``attention_features``) the backend cannot honour."""
    allowed = getattr(module, "attention_backends", BACKENDS)
    if backend not in allowed:
        missing = [
            FEATURE_NAMES[f] for f in getattr(module, "attention_features", ()) if backend not in FEATURE_BACKENDS[f]
        ]
        because = f" with {' and '.join(missing)}" if missing and backend in BACKENDS else ""
        raise ValueError(
            f"{type(module).__name__} cannot run attention backend {backend!r}{because}; choose one of {allowed}"
        )


def set_attention_backend(model: nn.Module, backend: Backend) -> nn.Module:
    """Run every attention of ``model`` (and build every mask) on ``backend``: the modules' ``attn_backend``
    and their configs' are set together, after every module that lists ``attention_backends`` accepted it."""
    for module in model.modules():
        check_backend(module, backend)
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = backend
        config = getattr(module, "config", None)
        if hasattr(config, "attn_backend"):
            config.attn_backend = backend
    return model


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    backend: str = "sdpa",
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped key/value heads, optionally with sinks and a sliding window.

    Args:
        q: ``(B, H, Tq, D)`` queries.
        k, v: ``(B, Hkv, Tk, D)`` keys and values; ``H`` must be a multiple of ``Hkv`` (GQA).
        mask: for ``sdpa``/``eager`` a boolean tensor broadcastable to ``(B, H, Tq, Tk)``, True
            where a query may attend, combined with ``is_causal``; for ``flex``/``varlen``/``xformers`` the
            object :func:`make_mask` built (causality included), or None (no mask; causal by ``is_causal``).
        is_causal: hide keys that come after the query (for ``Tq == Tk``; with a KV cache the
            queries are the last ``Tq`` positions of ``Tk``).
        backend: one of :data:`BACKENDS`.
        sinks: ``(H,)`` learned logits, one per query head, that join each query's softmax without a value.
        window: causal only: a query sees at most the ``window`` latest keys, itself included. ``sdpa``/``eager``
            apply it here (in the KV-cache frame too); ``flex`` reads it from the mask :func:`make_mask` built with
            the same ``window``.

    Returns:
        ``(B, H, Tq, D)``. A query whose every key is masked gets zeros.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if hasattr(mask, "attend_split"):  # rows split over a sequence-parallel group (components/sequence_parallel.py)
        return mask.attend_split(q, k, v, is_causal=is_causal, backend=backend, sinks=sinks, window=window)
    for feature, used in (("sinks", sinks is not None), ("sliding_window", window is not None)):
        if used and backend not in FEATURE_BACKENDS[feature]:
            raise ValueError(
                f"Attention backend {backend!r} cannot run {FEATURE_NAMES[feature]}; "
                f"choose one of {FEATURE_BACKENDS[feature]}"
            )
    if window is not None and not is_causal:
        raise ValueError(f"A sliding window ({window}) needs causal attention")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads")
    gqa = num_heads != num_kv_heads
    if backend == "flex":
        return _flex(q, k, v, mask, gqa, sinks)
    if backend == "varlen":
        if isinstance(mask, VarlenMask):
            return _varlen(q, k, v, mask)
        backend = "sdpa"  # nothing masked (one sequence a row), or a dense mask (incremental decoding): SDPA
    plain = sinks is None and window is None
    if plain and is_causal and mask is None and backend == "sdpa" and q.shape[2] == k.shape[2]:
        # flash kernels run here, and read the shared key/value heads without copying them
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if gqa and backend != "sdpa":  # the references repeat them; SDPA reads them in place, mask or not
        repeat = num_heads // num_kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if backend == "xformers":  # its bias holds causality and the documents already
        return _xformers(q, k, v, mask)
    if is_causal:
        causal = causal_mask(q.shape[2], k.shape[2], q.device, window)
        mask = causal if mask is None else mask & causal
    if sinks is not None:  # the sink takes the whole weight of a query with no key: its output is zero as it is
        return _sdpa_with_sinks(q, k, v, mask, sinks, gqa) if backend == "sdpa" else _eager(q, k, v, mask, sinks)
    row_has_keys = None
    if mask is not None:
        # A fully masked row (a padding query) has no defined softmax: let it attend anywhere so
        # that every kernel stays finite in both directions, then zero its output.
        row_has_keys = mask.any(dim=-1, keepdim=True)
        mask = mask | ~row_has_keys
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        out = _eager(q, k, v, mask)
    if row_has_keys is not None:
        out = out.masked_fill(~row_has_keys, 0.0)
    return out


@dataclass(frozen=True)
class VarlenMask:
    """The ``varlen`` backend's mask: the rows' segments (a document's tokens, or a run of padding) laid end to end.

    Attributes:
        cu_seqlens: ``(S + 1,)`` int32 offsets of the segments in the flattened ``B·T`` tokens.
        max_length: a bound on the longest segment (the next power of two, at most the row's length).
        causal: causal within each segment.
        keep: ``(B·T,)`` bool, False at padding (whose output is zeroed), or None when nothing is padding.
    """

    cu_seqlens: torch.Tensor
    max_length: int
    causal: bool
    keep: torch.Tensor | None = None


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: VarlenMask) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attn_backend 'varlen' is flash attention, which runs in float16 or bfloat16, not {q.dtype}: train with "
            "precision bf16-mixed (or 16-mixed), or choose 'sdpa' or 'flex'"
        )
    batch, heads, length, dim = q.shape
    # (B, H, T, D) → (B·T, H, D): the tokens of every row end to end, each segment attending within itself.
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (q, k, v))
    window = (-1, 0) if mask.causal else (-1, -1)
    out = varlen_attn(
        q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_length, mask.max_length,
        window_size=window, enable_gqa=heads != k.shape[1],
    )  # fmt: skip
    if mask.keep is not None:
        out = out.masked_fill(~mask.keep[:, None, None], 0.0)
    return out.reshape(batch, length, heads, dim).transpose(1, 2)


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        weights = torch.softmax(scores, dim=-1)
    else:  # one more column per query, the head's sink logit, whose weight is dropped after the softmax
        column = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return (weights @ v.float()).to(q.dtype)


def _sdpa_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sinks: torch.Tensor, gqa: bool
) -> torch.Tensor:
    """SDPA with sinks: the sink is one more key, with a zero value, that every query may attend. Its logit must
    be the head's sink whatever the query, so queries and keys get extra dimensions (zeros, up to a multiple of 8
    for the fused kernels): the sink key is 1 in the first of them and zero elsewhere, the real keys are zero
    there, and each query holds its head's ``sink / scale`` there; the scale stays that of the real head_dim."""
    batch, heads, length, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    pad = 8 - dim % 8
    scale = dim**-0.5
    sink_dim = (sinks / scale).to(q.dtype).view(1, heads, 1, 1).expand(batch, heads, length, 1)
    q = torch.cat([q, sink_dim, q.new_zeros(batch, heads, length, pad - 1)], dim=-1)
    sink_key = k.new_zeros(batch, kv_heads, 1, dim + pad)
    sink_key[..., dim] = 1.0
    k = torch.cat([torch.cat([k, k.new_zeros(batch, kv_heads, keys, pad)], dim=-1), sink_key], dim=2)
    v = torch.cat([v, v.new_zeros(batch, kv_heads, 1, dim)], dim=2)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool, sinks: torch.Tensor | None):
    flex = _flex_attention(q.device)
    if sinks is None:
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import AuxRequest

    # The output is normalised over the keys; the sink takes exp(sink) / (exp(lse) + exp(sink)) of the weight, so
    # the keys keep sigmoid(lse - sink) of it (a query with no key: lse = -inf, zero).
    out, aux = flex(q, k, v, block_mask=mask, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    kept = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * kept[..., None]).to(q.dtype)


def _flex_attention(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled, flex attention is a fused kernel; eager (CPU tests) it is a slow reference path.
    if device.type == "cuda":
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex
    return flex_attention


_compiled_flex = None


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias) -> torch.Tensor:
    import xformers.ops as xops

    batch, heads, length, dim = q.shape
    # xformers wants (B, T, H, D); with a block-diagonal bias (1, B·T, H, D), the documents of every row end to end.
    rows = batch if bias is None else 1
    q, k, v = (t.transpose(1, 2).reshape(rows, -1, heads, dim) for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.reshape(batch, -1, heads, dim).transpose(1, 2)


def make_mask(
    backend: str,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    length: int | None = None,
    window: int | None = None,
):
    """The mask :func:`attention` expects for ``backend``, from a ``(B, T)`` padding mask (1 = real
    token) and/or ``(B, T)`` document ids of packed rows (tokens attend within their document).
    ``window``: ``flex`` only, the sliding window of the layers that use this mask (causal; the dense backends
    apply their window in :func:`attention`; ``varlen`` and ``xformers`` have none).

    - ``sdpa``/``eager``: boolean ``(B, 1, T|1, T)``, or None when nothing is masked (no padding, no
      documents); causality stays with ``is_causal``.
    - ``varlen``: a :class:`VarlenMask` (causality included), or None when nothing is masked (as ``sdpa``).
    - ``flex``: a ``BlockMask`` (causality included).
    - ``xformers``: a block-diagonal bias over the rows laid end to end (causality included);
      padding must be marked by its own document id (the packing collator uses -1).
    """
    if backend in ("sdpa", "eager"):
        mask = None
        # No padding and one document per row: no mask at all, so that causal attention takes the fast path.
        if attention_mask is not None and (document_ids is not None or not bool(attention_mask.all())):
            mask = attention_mask.bool()[:, None, None, :]
        if document_ids is not None:
            same_document = (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
            mask = same_document if mask is None else mask & same_document
        return mask
    if window is not None and (backend != "flex" or not causal):
        raise ValueError(f"make_mask builds a sliding window only into a causal 'flex' mask, not {backend!r}")
    if backend == "varlen":
        return _varlen_mask(causal, attention_mask, document_ids)
    reference = document_ids if document_ids is not None else attention_mask
    if reference is None:
        if length is None:
            raise ValueError(f"make_mask for {backend!r} needs attention_mask, document_ids or length")
        batch, device = 1, None
    else:
        (batch, length), device = reference.shape, reference.device
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        keep = attention_mask.bool() if attention_mask is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = q_idx >= kv_idx if causal else q_idx == q_idx
            if document_ids is not None:
                allowed = allowed & (document_ids[b, q_idx] == document_ids[b, kv_idx])
            if keep is not None:
                allowed = allowed & keep[b, kv_idx]
            if window is not None:
                allowed = allowed & (q_idx - kv_idx < window)
            return allowed

        return create_block_mask(mask_mod, batch, None, length, length, device=device or "cpu")
    if backend == "xformers":
        from xformers.ops import fmha

        ids = document_ids if document_ids is not None else torch.zeros(batch, length, dtype=torch.long)
        seqlens = []
        for row in ids.tolist():
            start = 0
            for t in range(1, length + 1):
                if t == length or row[t] != row[t - 1]:
                    seqlens.append(t - start)
                    start = t
        kind = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
        return kind.from_seqlens(seqlens)
    raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _varlen_mask(causal: bool, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None):
    if document_ids is None and (attention_mask is None or bool(attention_mask.all())):
        return None
    reference = document_ids if document_ids is not None else attention_mask
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(reference, dtype=torch.bool)
    ids = document_ids if document_ids is not None else torch.zeros_like(reference)
    # A segment starts at each row's start and wherever the document or the padding changes.
    starts = torch.ones_like(keep)
    starts[:, 1:] = (ids[:, 1:] != ids[:, :-1]) | (keep[:, 1:] != keep[:, :-1])
    offsets = starts.flatten().nonzero().flatten()
    total = torch.tensor([keep.numel()], device=offsets.device)
    cu_seqlens = torch.cat([offsets, total]).to(torch.int32)
    # An upper bound is all the kernel needs: the next power of two (at most the row), so that compiled blocks see
    # a few values of it rather than one per batch.
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    max_length = min(1 << (longest - 1).bit_length(), keep.shape[1])
    return VarlenMask(cu_seqlens, max_length, causal, None if bool(keep.all()) else keep.flatten())


def causal_mask(
    num_queries: int, num_keys: int, device: torch.device | None = None, window: int | None = None
) -> torch.Tensor:
    """``(Tq, Tk)`` boolean mask; query i (the ``Tk - Tq + i``-th position) sees keys up to itself, and with a
    ``window`` only the ``window`` latest of them (itself included)."""
    offset = num_keys - num_queries
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=offset)
    return mask if window is None else mask.triu(diagonal=offset - window + 1)
