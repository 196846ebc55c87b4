"""Batches of samples: padded pairs for the contrastive stages, padded or packed rows for the rest.

Packing lays several samples end to end in one row (bounded by ``max_tokens`` and ``max_tiles_per_row``),
first-fit in arrival order. Samples are never split, so an ``<img>…</img>`` span never is either.
Each token carries its document id (attention stays inside a document) and its position within its
document: the sample's own ``positions`` (V2PE, or a split document's part) when it has them, else
``0..L−1``, so a packed row computes exactly what its samples would one by one.

A record's samples are ``{"views": {view name: sample}, "name"}`` (:class:`~lit_internvl.data.samples.SampleBuilder`),
each view collated into its own typed batch (:mod:`lit_internvl.batch`); a record that could not be built is
``{"skipped": reason, "name"}`` and is counted, not trained on; a split document ``{"parts": [...], "dropped": n}``
is its parts (its ``n`` dropped parts counted as skips). Every batch lists its skips by name too
(``skipped_records``, for :class:`~lit_internvl.callbacks.BadSampleReport`). An image–caption pair is the sample of
:mod:`lit_internvl.data.pairs` (image, ITC/ITM/ITG texts, and a negative text when the stage asks for one).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from lit_internvl.batch import IGNORE_INDEX, Batch, Images, PairBatch, TextBatch, Views
from lit_internvl.data.views import View

log = logging.getLogger(__name__)


def pad_ids(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors → ``input_ids (B, T)`` and ``attention_mask (B, T)`` (1 = real token)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


class PairCollator:
    """Image–caption pair samples (:mod:`lit_internvl.data.pairs`) → :class:`~lit_internvl.batch.Views` of the
    ``pair`` view (a :class:`~lit_internvl.batch.PairBatch`) and, with ``negative``, the ``negative`` view
    (a :class:`~lit_internvl.batch.TextBatch` of the ITM text of another image's caption, row for row).
    Text is right-padded with ``pad_id`` (mask 0)."""

    def __init__(self, pad_id: int, negative: bool = False) -> None:
        self.pad_id, self.negative = pad_id, negative

    def __call__(self, samples: list[dict]) -> Views:
        records = skipped_records(samples)
        skipped = dict(Counter(record["reason"] for record in records))
        samples = [s for s in samples if "skipped" not in s]
        if not samples:
            return Views(skipped=skipped, skipped_records=records)
        input_ids, attention_mask = pad_ids([s["input_ids"] for s in samples], self.pad_id)
        itm_ids, itm_mask = pad_ids([s["itm_ids"] for s in samples], self.pad_id)
        itg_ids, itg_mask = pad_ids([s["itg_ids"] for s in samples], self.pad_id)
        itg_labels, _ = pad_ids([s["itg_labels"] for s in samples], IGNORE_INDEX)
        views = {
            "pair": PairBatch(
                pixel_values=torch.stack([s["pixel_values"] for s in samples]),
                input_ids=input_ids,
                attention_mask=attention_mask,
                itm_ids=itm_ids,
                itm_mask=itm_mask,
                itg_ids=itg_ids,
                itg_mask=itg_mask,
                itg_labels=itg_labels,
                label=torch.tensor([s["label"] for s in samples], dtype=torch.long),
                caption_key=torch.tensor([s["caption_key"] for s in samples], dtype=torch.long),
                image_id=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                sample_names=[s.get("name") for s in samples],
            )  # fmt: skip
        }
        if self.negative:
            views["negative"] = TextBatch(*pad_ids([s["negative_ids"] for s in samples], self.pad_id))
        return Views(views, skipped, records)


def skipped_records(samples: list[dict]) -> list[dict]:
    """``{"name", "reason"}`` of each sample that could not be built and of each dropped part of a split document."""
    records = [{"name": s.get("name"), "reason": s["skipped"]} for s in samples if "skipped" in s]
    records += [record for s in samples for record in s.get("redrawn", ())]  # replaced by another (Redrawn)
    for s in samples:
        records += [{"name": s.get("name"), "reason": "empty split part"}] * s.get("dropped", 0)
    return records


def first_fit(lengths: list[int], tiles: list[int], max_tokens: int, max_tiles_per_row: int) -> list[list[int]]:
    """Group sample indices into rows: each sample goes to the first row with room for its tokens
    and its tiles, else opens a new row."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for index, (length, tile_count) in enumerate(zip(lengths, tiles)):
        if length > max_tokens or tile_count > max_tiles_per_row:
            raise ValueError(
                f"Sample {index} ({length} tokens, {tile_count} tiles) exceeds max_tokens {max_tokens} / "
                f"max_tiles_per_row {max_tiles_per_row}"
            )
        for row, (tokens_left, tiles_left) in enumerate(room):
            if length <= tokens_left and tile_count <= tiles_left:
                rows[row].append(index)
                room[row] = (tokens_left - length, tiles_left - tile_count)
                break
        else:
            rows.append([index])
            room.append((max_tokens - length, max_tiles_per_row - tile_count))
    return rows


class Collator:
    """Samples → :class:`~lit_internvl.batch.Views`: each view collated into a
    :class:`~lit_internvl.batch.Batch` (its fields and shapes are written there).

    Args:
        pad_id: token id of padding.
        views: the views of the samples (:mod:`lit_internvl.data.views`); a ``prompt`` view is left-padded (prompts
            to generate from), the others right-padded.
        pack: lay samples end to end (first fit); else one sample per row. Only a single conversation view packs.
        max_tokens, max_tiles_per_row: bounds of a packed row (tokens; tiles of all its images together).

    Unpacked batches also carry each sample's ``meta`` and ``reference`` (lists, one per row).
    """

    def __init__(
        self, pad_id: int, views: tuple[View, ...], pack: bool = False, max_tokens: int = 4096,
        max_tiles_per_row: int = 64,
    ) -> None:  # fmt: skip
        if pack and [view.kind for view in views] != ["conversation"]:
            raise ValueError(f"only a single conversation view is packed, not {[view.name for view in views]}")
        self.pad_id, self.views, self.pack = pad_id, tuple(views), pack
        self.max_tokens, self.max_tiles_per_row = max_tokens, max_tiles_per_row

    def __call__(self, samples: list[dict]) -> Views:
        records = skipped_records(samples)
        skipped = Counter(record["reason"] for record in records)
        samples = [part for s in samples if "skipped" not in s for part in s.get("parts", [s])]
        if samples and self.pack:
            samples = self._fitting(samples, skipped, records)
        if not samples:
            return Views(skipped=dict(skipped), skipped_records=records)
        views = {view.name: self.collate([s["views"][view.name] for s in samples], view) for view in self.views}
        return Views(views, dict(skipped), records)

    def _fitting(self, samples: list[dict], skipped: Counter, records: list[dict]) -> list[dict]:
        """The samples a packed row can hold; one of more tiles than ``max_tiles_per_row`` is a counted skip."""
        keep = []
        for sample in samples:
            pixels = next(iter(sample["views"].values()))["pixel_values"]
            count = 0 if pixels is None else pixels.shape[0]
            if count > self.max_tiles_per_row:
                log.warning("skipping %s: too many tiles: %d > max_tiles_per_row %d", sample.get("name"), count,
                            self.max_tiles_per_row)  # fmt: skip
                skipped["too many tiles"] += 1
                records.append({"name": sample.get("name"), "reason": "too many tiles"})
            else:
                keep.append(sample)
        return keep

    def collate(self, samples: list[dict], view: View) -> Batch:
        """One view's samples → its :class:`~lit_internvl.batch.Batch`."""
        left_pad = view.kind == "prompt"
        tiles = [0 if s.get("pixel_values") is None else s["pixel_values"].shape[0] for s in samples]
        if self.pack:
            rows = first_fit([len(s["input_ids"]) for s in samples], tiles, self.max_tokens, self.max_tiles_per_row)
        else:
            rows = [[i] for i in range(len(samples))]
        width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.float32)
        document_ids = torch.full(shape, -1, dtype=torch.long)
        pixel_values, budgets, tiles_per_row, names = [], [], [], []
        for r, row in enumerate(rows):
            start = width - sum(len(samples[i]["input_ids"]) for i in row) if left_pad else 0
            for document, i in enumerate(row):
                sample, length = samples[i], len(samples[i]["input_ids"])
                span = slice(start, start + length)
                input_ids[r, span] = sample["input_ids"]
                labels[r, span] = sample["labels"]
                attention_mask[r, span] = 1
                own = sample.get("positions")
                positions[r, span] = own if own is not None else torch.arange(length, dtype=torch.float32)
                document_ids[r, span] = document
                if tiles[i]:
                    pixel_values.append(sample["pixel_values"])
                    budgets += [sample["budget"]] * tiles[i]
                start += length
            tiles_per_row.append(sum(tiles[i] for i in row))
            names.append("+".join(str(samples[i].get("name", i)) for i in row))
        images = Images(torch.cat(pixel_values), tiles_per_row, budgets) if pixel_values else None
        return Batch(
            input_ids=input_ids, labels=labels, attention_mask=attention_mask, positions=positions,
            document_ids=document_ids if self.pack else None, images=images, sample_names=names,
            meta=None if self.pack else [s.get("meta") for s in samples],
            reference=None if self.pack else [s.get("reference") for s in samples],
        )  # fmt: skip
