"""Export a :class:`VisionLanguageModel` in transformers' InternVL layout, at the tile size it reads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from lit_internvl.hf.config import export_tile_size, text_model_type, transformers_config
from lit_internvl.hf.files import copy_tokenizer_files, save_sharded
from lit_internvl.hf.names import preview, to_transformers_state_dict
from lit_internvl.models.vlm import VisionLanguageModel


def export_vlm(
    model: VisionLanguageModel,
    output_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tile_size: int | None = None,
) -> Path:
    """Write ``model`` in transformers' InternVL layout; ``InternVLForConditionalGeneration.from_pretrained``
    loads the folder: ``config.json``, ``model.safetensors`` (sharded with an index past ``max_shard_bytes``)
    and, when ``tokenizer_dir`` is given, its tokenizer files.

    The export is at ``tile_size`` px tiles (default ``model.tile_size``, the size it trained at): the config's
    ``image_size`` and ``image_seq_length`` are that size's, and the position table is resized to its grid as
    the forward pass interpolates it, so transformers at that size computes what lit_internvl computes.
    """
    state = model.state_dict()
    refuse_lora(state)
    tile_size = export_tile_size(model, tile_size)
    config = transformers_config(model, tile_size=tile_size)
    state["vision.embeddings.position_embedding"] = _position_table(model, tile_size)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = str(dtypes.pop()).removeprefix("torch.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output))
    tensors = to_transformers_state_dict(state, text_model_type(model.decoder.config))
    # the copies to the CPU are the slow part of a large model's export (disable=None: a bar on a terminal only)
    bar = tqdm(tensors.items(), desc=f"export → {output}", unit=" tensors", total=len(tensors), disable=None)
    save_sharded({k: v.cpu() for k, v in bar}, output, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, output)
    return output


def _position_table(model: VisionLanguageModel, tile_size: int) -> torch.Tensor:
    """``(1, 1 + g², C)`` for the ``g × g`` grid of a ``tile_size`` px tile (transformers' table has the config's
    grid): the stored table at the native size, else the one the forward pass interpolates from it."""
    grid = tile_size // model.vision.config.patch_size
    with torch.no_grad():
        return model.vision.embeddings.position_embeddings(grid, grid).detach()


def refuse_lora(state: Mapping[str, torch.Tensor]) -> None:
    """The hook for LoRA: adapters must be merged (peft's ``merge_and_unload``) before an export."""
    lora = [name for name in state if "lora_" in name]
    if lora:
        raise ValueError(
            f"The checkpoint holds {len(lora)} LoRA tensor(s){preview(lora)}: merge the adapters into the base "
            "weights first (peft's merge_and_unload), then export the merged model"
        )
