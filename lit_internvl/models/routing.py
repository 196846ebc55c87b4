"""Tiles at other budgets, and the sequence shortened to match: InternVL3.5-Flash's routing.

A batch built at the connector's first budget (256 ``<IMG_CONTEXT>`` slots a 448 px tile; 16 a 112 px tile of the tiny
tower) can be turned into the batch the data would have built with some tiles at a smaller budget: each such tile keeps
the first ``budget`` slots of its run and loses the rest, and every row shortens by what its tiles lost::

    row     ... <img> [ctx × 256 | ctx × 256] </img> ...       tiles at 256, 256
    row'    ... <img> [ctx × 64  | ctx × 256] </img> ...       tile 0 compressed: 192 tokens fewer

as the Flash checkpoints' remote code does (``compress_visual_tokens_in_sentence``: ``keep_mask[start + 64 : end] =
False`` for each compressed 256-token block). Labels, attention mask and document ids lose the same columns; positions
are renumbered so that each document counts its kept tokens from where it did (as a freshly built sample would: the
remote code and LMDeploy recompute contiguous positions after compressing). Rows are padded again on their side
(prompts on the left, training rows on the right).

:func:`at_budgets` does that for any budgets a connector can give (ViCO's consistency stage draws them);
:func:`route_images` asks the router (:class:`~lit_internvl.components.FlashConnector`) which tiles to compress with
the released decision rule; :func:`route_batch` and :func:`route_prompts` put the two together for a training batch
and for prompts to generate from. The vision features computed for the router travel with the routed images
(``Images.features``), so the vision tower runs once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F

from lit_internvl.batch import IGNORE_INDEX, Batch, Images
from lit_internvl.distributed import unsharded

PaddingSide = Literal["left", "right"]


def routes(model) -> bool:
    """Whether ``model``'s connector routes its tiles (a :class:`~lit_internvl.components.FlashConnector` with
    ``route`` on)."""
    return bool(getattr(getattr(model, "connector", None), "routing", False))


def route_images(model, images: Images) -> Images:
    """``images`` with each tile at the first budget given the budget the router picks (the connector's
    :meth:`~lit_internvl.components.FlashConnector.compress` on the scores of those tiles together); tiles at other
    budgets stay, and images already routed are returned as they are. The vision features travel with the result
    unless the vision tower trains or the model runs on several processes (it then runs again in the forward). The
    router runs in eval mode (no dropout), without gradients: routing decides, it does not train (the router trains in
    :class:`~lit_internvl.stages.vico.ViRStage`).

    On several processes (``dummy_tile``) every call makes one vision pass, whatever the images: a rank whose batch
    the stage has routed already, or has no image, runs it on the dummy tile (:func:`join_vision_pass`), so that the
    ranks' FSDP2 all-gathers line up."""
    if images.routed:
        join_vision_pass(model, images.pixel_values.device)
        return images
    connector = model.connector
    first, second = model.budgets()[:2]
    features = images.features
    at_first = torch.tensor(images.budgets) == first
    budgets = list(images.budgets)
    # Outside the model's forward: FSDP2 gathers the root's parameters (the vision embeddings, the router) for it.
    with torch.no_grad(), unsharded(model):
        if features is None:
            features = model.vision(images.pixel_values)
        if at_first.any():
            training = connector.router.training
            connector.router.eval()
            scores = connector.scores(features[at_first.to(features.device)])
            connector.router.train(training)
    if at_first.any():
        for i, compress in zip(at_first.nonzero().flatten().tolist(), connector.compress(scores).tolist()):
            budgets[i] = second if compress else first
    # Features without gradients are kept only where no gradient is wanted: a vision tower that trains runs again in
    # the forward, inside the (data-parallel) model call. On several processes (dummy_tile) the tower runs again in
    # the forward too: a rank without images runs it there on the dummy tile, and under FSDP2 every rank must.
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in model.vision.parameters())
    kept = None if trains or getattr(model, "dummy_tile", False) else features
    return Images(images.pixel_values, list(images.tiles_per_sample), budgets, features=kept, routed=True)


def route_batch(model, batch: Batch, padding_side: PaddingSide = "right") -> Batch:
    """``batch`` with the tiles the router compresses shortened (:func:`route_images`, :func:`at_budgets`)."""
    if batch.images is None:
        join_vision_pass(model, batch.input_ids.device)
        return batch
    return at_budgets(batch, route_images(model, batch.images), model.image_context_id, padding_side)


def route_prompts(model, input_ids, attention_mask, images, positions=None):
    """Left-padded prompts and their images, routed: ``(input_ids, attention_mask, images, positions)`` shortened
    where the router compresses a tile (what :func:`~lit_internvl.inference.generate.generate` and the rollouts run
    on when the model routes)."""
    images = model.as_images(images)
    if images is None:
        join_vision_pass(model, input_ids.device)
        return input_ids, attention_mask, images, positions
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if positions is None:
        positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0).float()
    batch = Batch(input_ids, torch.full_like(input_ids, IGNORE_INDEX), attention_mask, positions, None, images, [])
    routed = route_batch(model, batch, "left")
    return routed.input_ids, routed.attention_mask, routed.images, routed.positions


def join_vision_pass(model, device) -> None:
    """What :func:`route_images` runs of the vision tower, on the model's dummy tile, for a batch without images when
    the model trains on several processes (``dummy_tile``): under FSDP2 each vision block all-gathers its parameters
    in that pass, and the ranks that route images would otherwise wait for this one."""
    if not getattr(model, "dummy_tile", False):
        return
    tile = torch.zeros(1, 3, model.tile_size, model.tile_size, device=device)
    with torch.no_grad(), unsharded(model):
        model.vision(tile)


def at_budgets(batch: Batch, images: Images, image_context_id: int, padding_side: PaddingSide = "right") -> Batch:
    """``batch`` (its tiles at ``batch.images.budgets``) as it would be with its tiles at ``images.budgets``: each
    tile keeps the first ``new`` of its ``old`` slots (a budget can only shrink), every field loses the same columns,
    positions are renumbered per document, and rows are padded again on ``padding_side``. ``images`` are the same tiles
    (their pixels, and features when routed) with their new budgets."""
    old = batch.images
    if old is None or list(old.tiles_per_sample) != list(images.tiles_per_sample):
        raise ValueError("at_budgets: the new images must be the batch's tiles, row for row")
    grown = [(i, a, b) for i, (a, b) in enumerate(zip(old.budgets, images.budgets)) if b > a]
    if grown:
        raise ValueError(
            f"at_budgets: a tile's slots can only shrink; tile {grown[0][0]}: {grown[0][1]} → {grown[0][2]}"
        )
    if old.budgets == images.budgets:
        return replace(batch, images=images)
    keep = _kept_columns(batch.input_ids, old, images, image_context_id)
    rows = []
    for r in range(batch.rows):
        real = batch.attention_mask[r].bool()
        kept = keep[r] & real
        positions = batch.positions[r][real]
        documents = batch.document_ids[r][real] if batch.document_ids is not None else None
        rows.append(
            {
                "input_ids": batch.input_ids[r][kept],
                "labels": batch.labels[r][kept],
                "positions": _renumbered(positions, keep[r][real], documents, batch.sample_names, r),
                "document_ids": None if documents is None else documents[keep[r][real]],
            }
        )
    width = max(len(row["input_ids"]) for row in rows)
    pad_id = int(batch.input_ids[~batch.attention_mask.bool()][0]) if (batch.attention_mask == 0).any() else 0

    def stack(key: str, value) -> torch.Tensor:
        return torch.stack([_pad(row[key], width, value, padding_side) for row in rows])

    mask = [torch.ones(len(row["input_ids"]), dtype=batch.attention_mask.dtype) for row in rows]
    return replace(
        batch,
        input_ids=stack("input_ids", pad_id),
        labels=stack("labels", IGNORE_INDEX),
        attention_mask=torch.stack([_pad(m.to(batch.input_ids.device), width, 0, padding_side) for m in mask]),
        positions=stack("positions", 0.0),
        document_ids=None if batch.document_ids is None else stack("document_ids", -1),
        images=images,
    )


def _kept_columns(input_ids: torch.Tensor, old: Images, new: Images, image_context_id: int) -> torch.Tensor:
    """``(R, T)`` bool: False on the slots each tile loses (the last ``old − new`` of its run of ``old``)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    tile = 0
    for r, tiles in enumerate(old.tiles_per_sample):
        slots = (input_ids[r] == image_context_id).nonzero().flatten()
        expected = sum(old.budgets[tile : tile + tiles])
        if len(slots) != expected:
            raise ValueError(f"row {r} has {len(slots)} <IMG_CONTEXT> slots, its {tiles} tile(s) take {expected}")
        start = 0
        for i in range(tile, tile + tiles):
            keep[r, slots[start + new.budgets[i] : start + old.budgets[i]]] = False
            start += old.budgets[i]
        tile += tiles
    return keep


def _renumbered(positions, keep, documents, names, row: int) -> torch.Tensor:
    """The kept tokens' positions: each token moves back by the tokens its document lost before it."""
    if not torch.equal(positions, positions.round()):
        name = names[row] if row < len(names) else f"row {row}"
        raise ValueError(
            f"{name}: routing renumbers integer positions; V2PE's fractional image positions (data v2pe) are not "
            "supported with budgets that change after the data built the sample"
        )
    lost = torch.cumsum((~keep).to(positions.dtype), dim=0)
    if documents is not None:  # each document counts only its own losses
        for document in documents.unique():
            inside = documents == document
            first = inside.nonzero()[0, 0]
            before = lost[first] - (~keep[first]).to(positions.dtype)
            lost[inside] -= before
    return (positions - lost)[keep]


def _pad(tensor: torch.Tensor, width: int, value, side: PaddingSide) -> torch.Tensor:
    pad = width - tensor.shape[0]
    return F.pad(tensor, (pad, 0) if side == "left" else (0, pad), value=value)
