"""Ulysses sequence parallelism: attention over rows whose tokens are split across a group of processes.

Each rank of a sequence-parallel group holds a contiguous slice of every row (``T / sp`` tokens: rank r the columns
``r·T/sp .. (r+1)·T/sp``). Everything in a decoder block but attention is per token and runs on the slice as it is;
attention needs every key of the row. Before it one all-to-all exchanges sequence for heads, so that each rank holds
``H / sp`` heads of the whole row, attention runs there as on one process (the whole row's mask: documents, padding,
causality, sliding windows), and a second all-to-all exchanges the heads back (DeepSpeed-Ulysses, Jacobs et al. 2023,
arXiv 2309.14509)::

    q, k, v  (B, H, T/sp, D) ──all-to-all──► (B, H/sp, T, D) ──attention()──► (B, H/sp, T, D) ──all-to-all──► (B, H, T/sp, D)

Queries, keys and values travel in one exchange. Key/value heads are split among the ranks like the query heads; when
there are fewer of them than ranks (or their count is not a multiple of the group), each is repeated just enough
(``sp / gcd(Hkv, sp)`` times) for the ranks to get whole ones: a rank's query heads then still read the key/value head
they read on one process. Attention sinks (one per query head) are sliced to the rank's heads.

The exchanges are autograd functional collectives (``torch.distributed._functional_collectives``), so that they run
inside compiled blocks and carry gradients back across ranks. :class:`SplitMask` is how a rank's decoder tells
:func:`~lit_internvl.components.attention.attention` that its rows are split: the decoder wraps the whole row's mask
in it (``Transformer.forward(..., sequence_parallel=)``), which also survives activation checkpointing's recomputation.

Gradient convention of everything split this way (here and in :mod:`lit_internvl.models.sequence_parallel`): whatever
needs the whole row is summed over the group with :func:`group_sum`, whose backward sums the ranks' gradients too; every
rank then computes the one-process loss, and the ranks' parameter gradients *averaged* over the group (what FSDP2 and
DDP do over a mesh that includes the group) are the one-process gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lit_internvl.components.attention import attention


class SequenceParallel:
    """A sequence-parallel group as the model sees it: its process group, this rank's place in it, and the slice of a
    row this rank holds."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    def __deepcopy__(self, memo) -> SequenceParallel:  # a frozen copy of a model shares the group, not a new one
        return self

    def __repr__(self) -> str:
        return f"SequenceParallel(rank {self.rank} of {self.size})"

    def columns(self, length: int) -> slice:
        """The columns of a ``length``-token row this rank holds (``length`` a multiple of the group's size)."""
        if length % self.size:
            raise ValueError(f"A row of {length} tokens cannot be split over a sequence-parallel group of {self.size}")
        part = length // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def split_mask(self, mask) -> SplitMask:
        """``mask`` (what :func:`~lit_internvl.components.attention.make_mask` built for the whole row) for the
        attention of this rank's slice."""
        return SplitMask(mask, self)


@dataclass(frozen=True)
class SplitMask:
    """The attention mask of rows split over a sequence-parallel group: the whole row's ``mask`` and the group."""

    mask: object
    sequence_parallel: SequenceParallel

    def attend_split(self, q, k, v, *, is_causal: bool, backend: str, sinks=None, window=None) -> torch.Tensor:
        return ulysses_attention(
            q, k, v, self.mask, self.sequence_parallel, is_causal=is_causal, backend=backend, sinks=sinks, window=window
        )


def kv_repeat(num_heads: int, num_kv_heads: int, size: int) -> int:
    """How many times each key/value head is repeated so that ``size`` ranks get whole ones (1: none)."""
    if num_heads % size:
        raise ValueError(
            f"Sequence parallelism splits the {num_heads} attention heads over {size} ranks: num_heads must be a "
            f"multiple of the group's size"
        )
    return size // math.gcd(num_kv_heads, size)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    sequence_parallel: SequenceParallel,
    *,
    is_causal: bool = False,
    backend: str = "sdpa",
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """:func:`~lit_internvl.components.attention.attention` of a rank's slice of the rows.

    Args:
        q: ``(B, H, T/sp, D)`` this rank's queries; k, v: ``(B, Hkv, T/sp, D)``.
        mask: the mask of the whole rows (``T`` queries and keys), as the backend wants it, or None.
        sinks: ``(H,)`` every head's sink (this rank uses its own heads').

    Returns:
        ``(B, H, T/sp, D)``: the attention output of this rank's tokens, every head.
    """
    size, rank = sequence_parallel.size, sequence_parallel.rank
    repeat = kv_repeat(q.shape[1], k.shape[1], size)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    heads, kv_heads = q.shape[1] // size, k.shape[1] // size
    # (B, H, T/sp, D) → (sp, B, heads of rank j, T/sp, D) for q, k and v together: chunk j goes to rank j.
    outgoing = torch.cat([t.unflatten(1, (size, -1)) for t in (q, k, v)], dim=2).transpose(0, 1)
    incoming = exchange(outgoing, sequence_parallel)  # (sp, B, my heads, T/sp, D): chunk j is rank j's slice
    whole = incoming.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, my heads, T, D), the slices in order
    q, k, v = whole.split([heads, kv_heads, kv_heads], dim=1)
    own_sinks = None if sinks is None else sinks.unflatten(0, (size, -1))[rank]
    out = attention(q, k, v, mask, is_causal=is_causal, backend=backend, sinks=own_sinks, window=window)
    outgoing = out.unflatten(2, (size, -1)).permute(2, 0, 1, 3, 4)  # (sp, B, my heads, T/sp, D): slice j to rank j
    incoming = exchange(outgoing, sequence_parallel)  # (sp, B, heads of rank j, T/sp, D): my slice
    return incoming.transpose(0, 1).flatten(1, 2)


def exchange(chunks: torch.Tensor, sequence_parallel: SequenceParallel) -> torch.Tensor:
    """All-to-all over the group with gradients: ``chunks[j]`` (dimension 0 of size ``sp``) goes to rank j, and
    chunk j of the result came from rank j."""
    import torch.distributed._functional_collectives as collectives

    out = collectives.all_to_all_single_autograd(chunks.contiguous(), None, None, sequence_parallel.group)
    return collectives.wait_tensor(out)


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def group_sum(tensor: torch.Tensor, sequence_parallel: SequenceParallel) -> torch.Tensor:
    """``tensor`` summed over the group; its backward sums the ranks' gradients (see the module docstring)."""
    return _GroupSum.apply(tensor, sequence_parallel.group)
