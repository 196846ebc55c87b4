"""``python -m lit_internvl export``: write a checkpoint in transformers' InternVL layout (an InternVL3.5-Flash model
in OpenGVLab's, which transformers has no class for: :mod:`lit_internvl.hf.flash_export`).

python -m lit_internvl export --checkpoint /path/to/InternVL3-1B --output out/
python -m lit_internvl export --checkpoint runs/sft/last.ckpt --arch InternVL3-1B --tokenizer DIR --output out/
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lit_internvl.checkpoints import read_model_facts
from lit_internvl.components.connectors import FlashConnector
from lit_internvl.hf import export_vlm, load_vlm, model_from_weights
from lit_internvl.hf.files import has_tokenizer
from lit_internvl.hf.flash_export import export_flash
from lit_internvl.models.builders import INTERNVL_PRESETS
from lit_internvl.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


def main(argv: list[str]) -> Path:
    """Load the checkpoint (a folder, or weights with ``--arch``) and export it; returns the folder written."""
    parser = _parser()
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    source = Path(args.checkpoint.removeprefix("hf:"))
    if source.is_dir():
        model, tokenizer = load_vlm(source, dtype=dtype), args.tokenizer or source
    else:
        if not args.arch:
            parser.error(
                "--arch is needed for a .ckpt/.safetensors: a preset name or the Hugging Face folder it came from"
            )
        model = model_from_weights(source, args.arch, dtype)
        arch_dir = Path(args.arch.removeprefix("hf:"))
        tokenizer = args.tokenizer or (arch_dir if arch_dir.is_dir() else None)
    if tokenizer is not None and args.tokenizer is None and not has_tokenizer(Path(tokenizer)):
        log.warning("%s has no tokenizer files; exporting the weights and config only", tokenizer)
        tokenizer = None
    tile_size = args.tile_size or _trained_tile_size(source, model)
    if isinstance(model.connector, FlashConnector):
        if tile_size != model.tile_size:
            parser.error(f"--tile-size {tile_size}: a Flash model exports at the size it reads, {model.tile_size} px")
        output = export_flash(model, args.output, tokenizer)
        count = sum(p.numel() for p in model.parameters())
        print(f"Exported {count:,} parameters to {output} (OpenGVLab's InternVL3.5-Flash layout, {tile_size} px tiles)")
        return output
    output = export_vlm(model, args.output, tokenizer, tile_size=tile_size)
    count = sum(p.numel() for p in model.parameters())
    print(f"Exported {count:,} parameters to {output} (transformers' InternVL layout, {tile_size} px tiles)")
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_internvl export",
        description="Write a checkpoint in transformers' InternVL layout (config.json, safetensors, tokenizer files).",
    )
    parser.add_argument(
        "--checkpoint", required=True,
        help="a Hugging Face InternVL folder (either layout), a Lightning .ckpt of a stage, "
        "or a .safetensors of lit_internvl names",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument(
        "--arch",
        help="architecture of a .ckpt/.safetensors: a preset name "
        f"({', '.join(sorted(INTERNVL_PRESETS))}) or the Hugging Face folder it was initialised from",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder to copy (default: the checkpoint's or --arch's folder)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: kept)")
    parser.add_argument(
        "--tile-size", type=int,
        help="tile side in px to export at (default: the size a .ckpt's run trained at, else the model's own)",
    )  # fmt: skip
    return parser


def _trained_tile_size(source: Path, model: VisionLanguageModel) -> int:
    """The tile size a Lightning checkpoint's run recorded; else (a folder, a .safetensors, an older run) the
    model's own."""
    recorded = None if source.is_dir() else read_model_facts(str(source)).get("tile_size")
    return int(recorded) if recorded else model.tile_size
