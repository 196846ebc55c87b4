"""The forward pass of a :class:`~lit_internvl.models.VisionLanguageModel` whose rows are split over a
sequence-parallel group (``model.sequence_parallel``; Ulysses attention: :mod:`lit_internvl.components.sequence_parallel`).

Every rank of the group gets the same batch (the whole rows) and computes one contiguous slice of them::

    rows (B, T), padded to a multiple of sp ──► rank r: columns r·T/sp .. (r+1)·T/sp
    tiles ──► split in sp contiguous shares ──► vision + connector on its share ──► group_sum ──► every tile's features
    embed_tokens(slice) ◄── features at the slice's <IMG_CONTEXT> slots
    decoder(slice; the whole rows' documents, padding and mask; the slice's V2PE positions)
    head(slice) ──► the slice's outputs ──► group_sum ──► the whole batch's outputs, on every rank

So every rank returns what one process returns on the whole batch (hidden states, logits or the chunked head's
cross-entropies), and the losses computed from them — every reduction of
:func:`~lit_internvl.losses.reduce_token_losses`, whose per-document counts span the ranks, MPO's sequence
log-probabilities, RL's token log-probabilities — need nothing of their own. Gradients follow the convention of
:mod:`lit_internvl.components.sequence_parallel`: averaged over the group (FSDP2 over a mesh that includes it) they are
the one-process gradients.

A rank whose share of the tiles is empty (fewer tiles than ranks, or a text-only batch) runs the vision tower on the
model's dummy tile (``dummy_tile``, zero-weighted) so that every rank's FSDP2 collectives match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.batch import Images
from lit_internvl.components.sequence_parallel import SequenceParallel, group_sum


def split_forward(
    model: nn.Module,
    sequence_parallel: SequenceParallel,
    input_ids: torch.Tensor,
    images: Images | torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    sample_names: Sequence[str] | None = None,
    repeat_images: int = 1,
    length_multiple: int | None = None,
    head=None,
) -> torch.Tensor:
    """``VisionLanguageModel.forward`` on this rank's slice of the rows (its arguments, see there); returns what
    the one-process forward returns on the whole batch."""
    batch, length = input_ids.shape
    width = _padded_width(length, sequence_parallel.size, length_multiple)
    device = input_ids.device
    if positions is None:
        positions = torch.arange(length, device=device, dtype=torch.float32).expand(batch, -1)
    if attention_mask is None and width > length:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    pad = width - length
    # Padding on the right: its own document (-1, as the packing collator's), masked, never an <IMG_CONTEXT> slot.
    filler = 0 if model.image_context_id != 0 else 1
    input_ids = F.pad(input_ids, (0, pad), value=filler)
    positions = F.pad(positions, (0, pad), value=0.0)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, pad), value=0)
    if document_ids is not None:
        document_ids = F.pad(document_ids, (0, pad), value=-1)
    columns = sequence_parallel.columns(width)
    embeds = _embed_slice(model, sequence_parallel, input_ids, images, columns, sample_names, repeat_images)
    decoder = model.decoder
    try:
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, positions=positions[:, columns],
            document_ids=document_ids, sequence_parallel=sequence_parallel,
        )  # fmt: skip
    except TypeError as error:
        if "sequence_parallel" not in str(error):
            raise
        raise ValueError(
            f"model.init_args.decoder {type(decoder).__name__} cannot be split over a sequence-parallel group: its "
            "forward takes no sequence_parallel argument (lit_internvl.components.Decoder does)"
        ) from error
    return _whole_output(head, decoder, hidden, sequence_parallel, columns, length, width)


def _padded_width(length: int, size: int, multiple: int | None) -> int:
    """The rows' width once padded to a multiple of the group's size (and of ``multiple``)."""
    step = math.lcm(size, multiple or 1)
    return -(-length // step) * step


def _embed_slice(model, sequence_parallel, input_ids, images, columns, sample_names, repeat_images) -> torch.Tensor:
    """``(B, T/sp, D)``: the embeddings of this rank's columns, image features written over their ``<IMG_CONTEXT>``
    slots (checked against the images on the whole rows, as ``VisionLanguageModel.embed`` checks them)."""
    embeds = model.decoder.embed_tokens(input_ids[:, columns])
    slots = input_ids == model.image_context_id
    images = model.as_images(images)
    if images is None or images.pixel_values.shape[0] == 0:
        if slots.any():  # the one-process error, naming the samples
            model.embed(input_ids, None, sample_names)
        if not model.dummy_tile:
            return embeds
        tile = torch.zeros(1, 3, model.tile_size, model.tile_size, device=embeds.device)
        return embeds + 0.0 * model.embed_images(tile).sum().to(embeds.dtype)
    tokens = images.tokens_per_sample()
    features = _all_features(model, sequence_parallel, images, embeds)
    if repeat_images > 1:
        per_sample = features.split(tokens)
        features = torch.cat([part for part in per_sample for _ in range(repeat_images)])
        tokens = [count for count in tokens for _ in range(repeat_images)]
    model._check_counts(slots, tokens, images, sample_names, repeat_images)
    # Feature k belongs to the k-th slot of the whole batch, row-major (as masked_scatter fills them in one process).
    index = (slots.flatten().cumsum(0) - 1).view_as(slots)[:, columns]
    own = slots[:, columns]
    return embeds.masked_scatter(own[..., None], features[index[own]])


def _all_features(model, sequence_parallel, images: Images, embeds: torch.Tensor) -> torch.Tensor:
    """``(Σ budgets, D)`` every tile's features on every rank, each rank encoding a contiguous share of the tiles."""
    budgets = images.budgets
    share = torch.tensor_split(torch.arange(len(budgets)), sequence_parallel.size)[sequence_parallel.rank].tolist()
    before, total = sum(budgets[: share[0]]) if share else 0, sum(budgets)
    dtype, width = embeds.dtype, embeds.shape[-1]
    if share:
        first, last = share[0], share[-1] + 1
        carried = None if images.features is None else images.features[first:last]  # routing ran the tower already
        own = Images(images.pixel_values[first:last], [len(share)], [budgets[i] for i in share], carried)
        mine = model.embed_images(own).to(dtype)
    else:
        mine = embeds.new_zeros(0, width)
        if model.dummy_tile:  # the vision tower still runs here: its FSDP2 collectives must match the other ranks'
            tile = torch.zeros(1, 3, model.tile_size, model.tile_size, device=embeds.device)
            mine = mine + 0.0 * model.embed_images(tile).sum().to(dtype)
    after = total - before - mine.shape[0]
    placed = torch.cat([mine.new_zeros(before, width), mine, mine.new_zeros(after, width)])
    return group_sum(placed, sequence_parallel)


def _whole_output(head, decoder, hidden, sequence_parallel, columns: slice, length: int, width: int):
    """The head's output on the whole batch, on every rank, from this rank's slice of the hidden states."""
    if head is None:
        out = hidden
        chosen = None
    else:
        if not hasattr(head, "columns"):
            raise ValueError(
                f"The head {type(head).__name__} cannot be split over a sequence-parallel group: it has no columns() "
                "(lit_internvl.models.vlm.Logits and CrossEntropy have)"
            )
        out = head.columns(columns, width)(decoder, hidden)
        chosen = head.chosen()
    if chosen is None:  # every position: (B, T/sp, ...) → (B, T, ...)
        placed = F.pad(out, (0, 0) * (out.dim() - 2) + (columns.start, width - columns.stop))
        return group_sum(placed, sequence_parallel)[:, :length]
    # The chosen positions of the whole batch, row-major: (N, ...), this rank's N_r of them in place.
    chosen = F.pad(chosen, (0, width - chosen.shape[1]), value=False)
    index = (chosen.flatten().cumsum(0) - 1).view_as(chosen)[:, columns][chosen[:, columns]]
    placed = out.new_zeros(int(chosen.sum()), *out.shape[1:]).index_copy(0, index, out)
    return group_sum(placed, sequence_parallel)
