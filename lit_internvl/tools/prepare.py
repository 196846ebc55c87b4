"""``python -m lit_internvl prepare``: records (jsonl + image root, or an InternVL meta file) → litdata
shards, with :func:`lit_internvl.data.prepare.prepare`.

    python -m lit_internvl prepare --input train.jsonl --image-root images/ --output shards/
    python -m lit_internvl prepare --meta meta.json --output s3://bucket/shards --num-workers 8
    python -m lit_internvl prepare --input refcoco.jsonl --image-root coco/ --output shards/ --box-scale pixel

Bad records are skipped with a message naming file and line and counted in the summary; ``--strict``
makes the first one an error.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from lit_internvl.data.grounding import BOX_SCALES
from lit_internvl.data.images import DEFAULT_MAX_PIXELS
from lit_internvl.data.prepare import prepare
from lit_internvl.data.records import DatasetSpec, read_meta


def main(argv: list[str]) -> dict:
    """Parse ``argv`` (the arguments after ``prepare``), write the shards, return the summary."""
    parser = argparse.ArgumentParser(prog="python -m lit_internvl prepare", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a jsonl file of records")
    source.add_argument("--meta", help="an InternVL meta file listing datasets")
    parser.add_argument(
        "--image-root", help="folder the --input image paths are relative to (default: the --input file's folder, as "
        "RecordsDataModule reads a jsonl file)",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="output folder or object-storage URL (s3://...)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--max-tiles", type=int, default=None, help="max_dynamic_patch for --input records")
    parser.add_argument(
        "--storage-options", type=json.loads, default=None, metavar="JSON",
        help='object-storage client options as a JSON object, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )  # fmt: skip
    parser.add_argument(
        "--box-scale", choices=BOX_SCALES, default="1000",
        help="coordinates of the records' <box>[[x1, y1, x2, y2]]</box>: pixels, 0-1 or InternVL's 0-1000 "
        "(written as 0-1000 either way)",
    )  # fmt: skip
    parser.add_argument(
        "--max-image-pixels", type=lambda v: None if v == "none" else int(v), default=DEFAULT_MAX_PIXELS,
        help=f"larger images are bad records, checked before decoding (default PIL's {DEFAULT_MAX_PIXELS}; 'none')",
    )  # fmt: skip
    parser.add_argument(
        "--allow-absolute-paths", action="store_true",
        help="records may name images by absolute path (relative ones must stay inside the image root)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.meta:
        specs = read_meta(args.meta)
    else:
        root = Path(args.image_root) if args.image_root else Path(args.input).parent
        specs = [DatasetSpec(Path(args.input).stem, Path(args.input), root, 1, args.max_tiles)]
    specs = [replace(spec, allow_absolute_paths=args.allow_absolute_paths) for spec in specs]
    return prepare(
        specs, args.output, args.num_workers, args.strict, storage_options=args.storage_options,
        max_image_pixels=args.max_image_pixels, box_scale=args.box_scale,
    )  # fmt: skip
