""":func:`prepare`: records (jsonl + image root, or an InternVL meta file) → litdata shards of encoded images.

The ``python -m lit_internvl prepare`` command (:mod:`lit_internvl.tools.prepare`) calls it.

Bad records (:data:`~lit_internvl.data.records.SKIP_REASONS`) are skipped with a message naming
file and line and counted in the summary: those found on the scan by reason, those found by the
worker processes that open the images (bad images, pixel boxes outside them) in one count;
``strict`` makes the first one an error. ``repeat_time`` is applied here, so datasets are mixed in
the shards by their weights. Grounding boxes are written on InternVL's 0–1000 grid, converted from
``box_scale`` (:mod:`lit_internvl.data.grounding`).
A pair record with several captions (``"texts"``) is written as one item per caption
(:func:`~lit_internvl.data.pairs.split_captions`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from lit_internvl.data.grounding import BOX_SCALES, BoxScale
from lit_internvl.data.images import DEFAULT_MAX_PIXELS
from lit_internvl.data.pairs import record_captions, split_captions
from lit_internvl.data.records import DatasetSpec, SkipCounter, encode_record, index_records, read_record

log = logging.getLogger(__name__)


def encode_items(item: tuple, strict: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS, box_scale: BoxScale = "1000"):
    """litdata worker function: :func:`~lit_internvl.data.records.encode_record`, one item per caption."""
    for encoded in encode_record(item, strict, max_pixels, box_scale):
        yield from split_captions(encoded)


def _item_count(item: tuple) -> int:
    """How many shard items a work item becomes (its captions for a multi-caption pair, else one)."""
    record = read_record(item)
    return len(record_captions(record)) if record.kind == "pair" else 1


def prepare(
    specs: list[DatasetSpec],
    output_dir: str,
    num_workers: int = 1,
    strict: bool = False,
    chunk_bytes: str = "64MB",
    storage_options: dict | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    box_scale: BoxScale = "1000",
) -> dict:
    """Write shards for ``specs`` to ``output_dir`` (a folder or an object-storage URL);
    ``storage_options`` reach the storage client (e.g. ``{"endpoint_url": ...}``). Images over
    ``max_image_pixels`` are bad records; boxes in the records' texts are in ``box_scale``."""
    from litdata import optimize

    if box_scale not in BOX_SCALES:
        raise ValueError(f"box_scale must be one of {BOX_SCALES}, got {box_scale!r}")
    skips = SkipCounter()
    items = [item for spec in specs for item in index_records(spec, strict, skips, box_scale)]
    if not items:
        raise ValueError(f"No valid records in {[str(s.annotation) for s in specs]} ({skips.total} skipped)")
    # litdata stages chunks in one shared folder that every optimize() empties when it starts:
    # give each prepare its own, so that two runs on one machine do not delete each other's work.
    with tempfile.TemporaryDirectory(prefix="lit_internvl_prepare_") as staging:
        previous = os.environ.get("DATA_OPTIMIZER_CACHE_FOLDER")
        os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = staging
        try:
            optimize(
                fn=functools.partial(encode_items, strict=strict, max_pixels=max_image_pixels, box_scale=box_scale),
                inputs=items,
                output_dir=output_dir,
                num_workers=num_workers,
                chunk_bytes=chunk_bytes,
                mode="overwrite",
                start_method="fork",
                storage_options=storage_options or {},
            )
        finally:
            if previous is None:
                os.environ.pop("DATA_OPTIMIZER_CACHE_FOLDER", None)
            else:
                os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = previous
    summary = {"written": _written(output_dir), "skipped_on_scan": dict(skips.counts)}
    if summary["written"] is not None:
        expected = sum(_item_count(item) for item in items)
        summary["skipped_on_encode"] = expected - summary["written"]  # bad images, pixel boxes outside them
    log.warning("prepare → %s: %s", output_dir, summary)
    if summary["written"] == 0:
        raise ValueError(f"prepare → {output_dir}: every record was skipped ({summary}); see the messages above")
    return summary


def _written(output_dir: str) -> int | None:
    """Samples in a local output's index (None for object storage)."""
    index = Path(output_dir) / "index.json"
    if not index.is_file():
        return None
    return sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"])
