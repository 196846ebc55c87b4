"""``python -m lit_internvl prepare``: records (jsonl + image root, or an InternVL meta file) →
litdata shards, images stored as their encoded bytes.

    python -m lit_internvl prepare --input train.jsonl --image-root images/ --output shards/
    python -m lit_internvl prepare --meta meta.json --output s3://bucket/shards --num-workers 8

Bad records (malformed JSON or fields, placeholder/image count mismatch, missing or corrupt
images) are skipped with a message naming file and line (missing and corrupt images are found by
the worker processes, which log them), and counted in the summary; ``--strict`` makes the first
one an error. ``repeat_time`` is applied here, so datasets are mixed
in the shards by their weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from lit_internvl.data.records import DatasetSpec, SkipCounter, encode_record, index_records, read_meta

log = logging.getLogger(__name__)


def prepare(
    specs: list[DatasetSpec],
    output_dir: str,
    num_workers: int = 1,
    strict: bool = False,
    chunk_bytes: str = "64MB",
    storage_options: dict | None = None,
) -> dict:
    """Write shards for ``specs`` to ``output_dir`` (a folder or an object-storage URL);
    ``storage_options`` reach the storage client (e.g. ``{"endpoint_url": ...}``)."""
    from litdata import optimize

    skips = SkipCounter()
    items = [item for spec in specs for item in index_records(spec, strict, skips)]
    if not items:
        raise ValueError(f"No valid records in {[str(s.annotation) for s in specs]} ({skips.total} skipped)")
    # litdata stages chunks in one shared folder that every optimize() empties when it starts:
    # give each prepare its own, so that two runs on one machine do not delete each other's work.
    with tempfile.TemporaryDirectory(prefix="lit_internvl_prepare_") as staging:
        previous = os.environ.get("DATA_OPTIMIZER_CACHE_FOLDER")
        os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = staging
        try:
            optimize(
                fn=functools.partial(encode_record, strict=strict),
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
        summary["skipped_on_encode"] = len(items) - summary["written"]  # missing or corrupt images
    log.warning("prepare → %s: %s", output_dir, summary)
    return summary


def _written(output_dir: str) -> int | None:
    """Samples in a local output's index (None for object storage)."""
    index = Path(output_dir) / "index.json"
    if not index.is_file():
        return None
    return sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"])


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl prepare", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a jsonl file of records")
    source.add_argument("--meta", help="an InternVL meta file listing datasets")
    parser.add_argument("--image-root", default=".", help="folder the --input image paths are relative to")
    parser.add_argument("--output", required=True, help="output folder or object-storage URL (s3://...)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--max-tiles", type=int, default=None, help="max_dynamic_patch for --input records")
    parser.add_argument(
        "--storage-options", type=json.loads, default=None, metavar="JSON",
        help='object-storage client options as a JSON object, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.meta:
        specs = read_meta(args.meta)
    else:
        specs = [DatasetSpec(Path(args.input).stem, Path(args.input), Path(args.image_root), 1.0, args.max_tiles)]
    return prepare(specs, args.output, args.num_workers, args.strict, storage_options=args.storage_options)
