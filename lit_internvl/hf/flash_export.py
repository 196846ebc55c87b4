"""Export an InternVL3.5-Flash model in OpenGVLab's layout (the names of :mod:`lit_internvl.hf.flash`): transformers
has no Flash model to export to."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_internvl.components.connectors import FlashConnector
from lit_internvl.components.vision import InternViT
from lit_internvl.hf.config import OPENGVLAB_VISION, VISION_FIELDS, _text_config, _theirs
from lit_internvl.hf.export import refuse_lora
from lit_internvl.hf.files import copy_tokenizer_files, save_sharded
from lit_internvl.hf.flash import MLP1_OPENGVLAB, MLP2_OPENGVLAB
from lit_internvl.hf.names import _split_experts
from lit_internvl.models.vlm import VisionLanguageModel


def export_flash(
    model: VisionLanguageModel,
    output_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    template: str = "internvl2_5",
    max_shard_bytes: int = 5 * 1024**3,
    max_position_embeddings: int = 32768,
) -> Path:
    """Write a Flash ``model`` in OpenGVLab's layout (names above; the config's ``flash_mode`` is the connector's
    ``routing``), at the tile size the model reads: ``config.json``, ``model.safetensors`` (sharded past
    ``max_shard_bytes``) and, with ``tokenizer_dir``, its tokenizer files. The decoder is written as its transformers
    text model (Qwen3, Qwen3-MoE, Qwen2, LLaMA: its experts one matrix each, as the releases store them)."""
    connector, vision = model.connector, model.vision
    if not isinstance(connector, FlashConnector) or not isinstance(vision, InternViT):
        raise ValueError(
            f"export_flash writes an InternViT + FlashConnector model, got {type(vision).__name__} + "
            f"{type(connector).__name__}"
        )
    state = model.state_dict()
    refuse_lora(state)
    language = model.decoder.config
    text = _text_config(language, max_position_embeddings)
    if text.model_type == "gpt_oss":
        raise ValueError("export_flash: no InternVL3.5-Flash release has a GPT-OSS decoder; its names are not mapped")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix, projection = name.rsplit(".", 1)
            tensors.update(_split_experts("language_model.model." + prefix[len("decoder.") :], projection, tensor))
        else:
            tensors[_opengvlab_name(name)] = tensor.contiguous()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    vision_config = {
        OPENGVLAB_VISION[field][0]: value for field, value in _theirs(VISION_FIELDS, vision.config).items()
    }
    llm = text.to_dict()
    llm["architectures"] = [type(text).__name__.replace("Config", "ForCausalLM")]
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": template,
        "downsample_ratio": 1 / connector.mlp1.factor, "ps_version": "v2", "select_layer": vision.config.select_layer,
        "force_image_size": model.tile_size, "tie_word_embeddings": language.tie_embeddings,
        "flash_mode": connector.routing, "flash_relative_threshold": connector.relative_threshold,
        "flash_absolute_threshold": connector.absolute_threshold, "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", **vision_config,
            "image_size": model.tile_size, "patch_size": vision.config.patch_size, "hidden_act": "gelu",
            "drop_path_rate": vision.config.drop_path_rate,
        },
    }  # fmt: skip
    (output / "config.json").write_text(json.dumps(config, indent=2, default=str))
    save_sharded(tensors, output, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, output)
    return output


def _opengvlab_name(name: str) -> str:
    """OpenGVLab's name of a lit_internvl tensor of an InternViT + FlashConnector + decoder model."""
    if name.startswith("vision.layers."):
        return "vision_model.encoder." + name[len("vision.") :]
    if name.startswith("vision."):
        return "vision_model." + name[len("vision.") :]
    for ours, theirs, table in (
        ("connector.mlp1.", "mlp1.", MLP1_OPENGVLAB),
        ("connector.mlp2.", "mlp2.", MLP2_OPENGVLAB),
    ):
        if name.startswith(ours):
            module, leaf = name[len(ours) :].split(".", 1)
            return f"{theirs}{table[module]}.{leaf}"
    for ours, theirs in (
        ("connector.router.pooling.", "pooling_before_gating."),
        ("connector.router.gating.", "gating."),
    ):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    if name.startswith("decoder.lm_head."):
        return "language_model.lm_head." + name[len("decoder.lm_head.") :]
    if name.startswith("decoder."):
        return "language_model.model." + name[len("decoder.") :]
    raise ValueError(f"{name} has no name in OpenGVLab's InternVL3.5-Flash layout")
