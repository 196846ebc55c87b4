"""Batches of samples: padded pairs for the contrastive stages, padded or packed rows for the rest.

Packing lays several samples end to end in one row (bounded by ``max_tokens`` and ``max_tiles_per_row``),
first-fit in arrival order. Samples are never split, so an ``<img>…</img>`` span never is either.
Each token carries its document id (attention stays inside a document) and its position within its
document: the sample's own ``positions`` (V2PE, or a split document's part) when it has them, else
``0..L−1``, so a packed row computes exactly what its samples would one by one.

A sample is ``{"input_ids": (L,), "labels": (L,), "pixel_values": (tiles, 3, H, W) | None, "name"}``;
a sample that could not be built is ``{"skipped": reason, "name"}`` and is counted, not trained on; a split
document ``{"parts": [sample, ...], "dropped": n}`` is its parts (its ``n`` dropped parts counted as skips).
Every batch lists its skips by name too (``skipped_records``, for :class:`~lit_internvl.callbacks.BadSampleReport`).
An image–caption pair is the sample of :mod:`lit_internvl.data.pairs` (image, ITC/ITM/ITG texts, a negative text).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from lit_internvl.losses import IGNORE_INDEX

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
    """Image–caption pair samples (:mod:`lit_internvl.data.pairs`) → the pair batch of the dual-encoder stages:

    - ``pixel_values (B, 3, S, S)``: one tile per image;
    - ``input_ids``/``attention_mask (B, T)``: the ITC text (``"summarize:"`` + caption + end);
    - ``itm_ids``/``itm_mask``: the ITM text of the sample's caption; ``negative_ids``/``negative_mask``: the
      ITM text of another image's caption;
    - ``itg_ids``/``itg_mask``/``itg_labels``: the ITG text (``"English caption:"`` + caption + end), its
      labels unshifted, -100 on the prefix and the padding;
    - ``label (B,)``: the class label (-1: none); ``caption_key (B,)``: rows with equal keys match each
      other; ``image_id (B,)``: which image a row shows (retrieval counts each image once);
    - ``skipped``: a count of dropped samples by reason; ``skipped_records``: each one's ``{"name", "reason"}``.

    Text is right-padded with ``pad_id`` (mask 0). A batch whose samples were all skipped is
    ``{"skipped": ..., "skipped_records": ..., "input_ids": None}``.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        records = skipped_records(samples)
        skipped = Counter(record["reason"] for record in records)
        samples = [s for s in samples if "skipped" not in s]
        if not samples:
            return {"skipped": dict(skipped), "skipped_records": records, "input_ids": None}
        input_ids, attention_mask = pad_ids([s["input_ids"] for s in samples], self.pad_id)
        itm_ids, itm_mask = pad_ids([s["itm_ids"] for s in samples], self.pad_id)
        negative_ids, negative_mask = pad_ids([s["negative_ids"] for s in samples], self.pad_id)
        itg_ids, itg_mask = pad_ids([s["itg_ids"] for s in samples], self.pad_id)
        itg_labels, _ = pad_ids([s["itg_labels"] for s in samples], IGNORE_INDEX)
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "itm_ids": itm_ids,
            "itm_mask": itm_mask,
            "negative_ids": negative_ids,
            "negative_mask": negative_mask,
            "itg_ids": itg_ids,
            "itg_mask": itg_mask,
            "itg_labels": itg_labels,
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "caption_key": torch.tensor([s["caption_key"] for s in samples], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "sample_names": [s.get("name") for s in samples],
            "skipped": dict(skipped),
            "skipped_records": records,
        }


def skipped_records(samples: list[dict]) -> list[dict]:
    """``{"name", "reason"}`` of each sample that could not be built and of each dropped part of a split document."""
    records = [{"name": s.get("name"), "reason": s["skipped"]} for s in samples if "skipped" in s]
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
    """Samples → a batch for :class:`~lit_internvl.models.VisionLanguageModel`.

    Returns ``input_ids``, ``labels``, ``attention_mask``, ``positions`` (float32), ``document_ids``
    (packed only; padding gets -1), all ``(R, T)``; ``pixel_values`` ``(tiles, 3, H, W)`` in row order
    or None; ``tiles_per_sample`` and ``sample_names`` per row; ``skipped``, a count of dropped
    samples by reason, and ``skipped_records``, each one's ``{"name", "reason"}``.

    Args:
        pad_id: token id of padding.
        pack: lay samples end to end (first fit); else one sample per row.
        max_tokens, max_tiles_per_row: bounds of a packed row (tokens; tiles of all its images together).
        left_pad: pad on the left (prompts to generate from), not packed.

    Unpacked batches also carry each sample's ``meta`` and ``reference`` (lists, one per row).
    """

    def __init__(
        self,
        pad_id: int,
        pack: bool = False,
        max_tokens: int = 4096,
        max_tiles_per_row: int = 64,
        left_pad: bool = False,
    ) -> None:
        if pack and left_pad:
            raise ValueError("left_pad is for generation prompts, which are not packed")
        self.pad_id, self.pack, self.max_tokens, self.max_tiles_per_row = pad_id, pack, max_tokens, max_tiles_per_row
        self.left_pad = left_pad

    def __call__(self, samples: list[dict]) -> dict:
        records = skipped_records(samples)
        skipped = Counter(record["reason"] for record in records)
        samples = [part for s in samples if "skipped" not in s for part in s.get("parts", [s])]
        if not samples:
            return {"skipped": dict(skipped), "skipped_records": records, "input_ids": None}
        tiles = [0 if s.get("pixel_values") is None else s["pixel_values"].shape[0] for s in samples]
        if self.pack and max(tiles) > self.max_tiles_per_row:  # no row could hold it: a counted skip, not a crash
            for sample, count in zip(samples, tiles):
                if count > self.max_tiles_per_row:
                    log.warning("skipping %s: too many tiles: %d > max_tiles_per_row %d", sample.get("name"), count,
                                self.max_tiles_per_row)  # fmt: skip
                    skipped["too many tiles"] += 1
                    records.append({"name": sample.get("name"), "reason": "too many tiles"})
            keep = [i for i, count in enumerate(tiles) if count <= self.max_tiles_per_row]
            samples, tiles = [samples[i] for i in keep], [tiles[i] for i in keep]
            if not samples:
                return {"skipped": dict(skipped), "skipped_records": records, "input_ids": None}
        preference = "rejected" in samples[0]
        if preference and self.pack:
            raise ValueError("Preference samples (chosen/rejected) cannot be packed; set pack: false")
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
        pixel_values, tiles_per_row, names = [], [], []
        for r, row in enumerate(rows):
            start = width - sum(len(samples[i]["input_ids"]) for i in row) if self.left_pad else 0
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
                start += length
            tiles_per_row.append(sum(tiles[i] for i in row))
            names.append("+".join(str(samples[i].get("name", i)) for i in row))
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "positions": positions,
            "document_ids": document_ids if self.pack else None,
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,
            "tiles_per_sample": tiles_per_row,
            "sample_names": names,
            "skipped": dict(skipped),
            "skipped_records": records,
        }
        if not self.pack:
            batch["meta"] = [s.get("meta") for s in samples]
            batch["reference"] = [s.get("reference") for s in samples]
        if preference:
            rejected = Collator(self.pad_id)([{**s["rejected"], "pixel_values": None} for s in samples])
            batch["rejected"] = {k: rejected[k] for k in ("input_ids", "labels", "attention_mask", "positions")}
        return batch
