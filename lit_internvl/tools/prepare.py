"""``python -m lit_internvl prepare``: records (jsonl + image root, or an InternVL meta file) → litdata
shards, with :func:`lit_internvl.data.prepare.prepare`.

    python -m lit_internvl prepare --input train.jsonl --image-root images/ --output shards/
    python -m lit_internvl prepare --meta meta.json --output s3://bucket/shards --num-workers 8

Bad records are skipped with a message naming file and line and counted in the summary; ``--strict``
makes the first one an error.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lit_internvl.data.prepare import prepare
from lit_internvl.data.records import DatasetSpec, read_meta


def main(argv: list[str]) -> dict:
    """Parse ``argv`` (the arguments after ``prepare``), write the shards, return the summary."""
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
