"""``config.json`` ↔ lit_internvl configs: one table of field pairs per component, read in one direction
(:func:`read_config`, either published layout) and written in the other (:func:`transformers_config`).

Nothing from the checkpoint runs: ``config.json`` is read as JSON (``auto_map`` entries are ignored) and mapped
field by field. A feature the components do not implement (rope scaling other than dynamic NTK, biases the
blocks lack, sliding windows outside GPT-OSS, ...) is refused with a message rather than loaded silently wrong.

GPT-OSS (``text_config.model_type: gpt_oss``, ``llm_config.architectures: [GptOssForCausalLM]``; transformers'
``GptOssConfig``) maps to a :class:`LanguageConfig` with sinks, ``layer_types``, YaRN and a ``MoEConfig`` of style
``"gpt_oss"`` (:func:`_language_from_gpt_oss`, and :func:`_gpt_oss_text_config` back).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lit_internvl.components.connectors import PixelShuffleMLP
from lit_internvl.components.language import Decoder, LanguageConfig
from lit_internvl.components.moe import MoEConfig
from lit_internvl.components.rotary import RopeScaling
from lit_internvl.components.vision import InternViT, InternViTConfig
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.hf.files import UnsupportedCheckpointError, checkpoint_folder, read_json, token_id, weight_names
from lit_internvl.hf.flash import flash_options
from lit_internvl.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

# -- the two-way tables ----------------------------------------------------------------------------------------

# (InternViTConfig field, InternVLVisionConfig field). Beside it: image/patch size (transformers' square lists)
# and select_layer (the top-level vision_feature_layer).
VISION_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("norm_type", "norm_type"),
    ("norm_eps", "layer_norm_eps"),
    ("qkv_bias", "attention_bias"),
    ("qk_norm", "use_qk_norm"),
    ("layer_scale_init", "layer_scale_init_value"),
)
# (LanguageConfig field, Qwen2Config/LlamaConfig/Qwen3Config field). Beside it: head_dim, rope_theta (rope_parameters),
# qkv_bias (Qwen2 has it, LLaMA and Qwen3 not), qk_norm (Qwen3 has it) and tie_embeddings (the top-level flag).
LANGUAGE_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("intermediate_size", "intermediate_size"),
    ("norm_eps", "rms_norm_eps"),
)
# (MoEConfig field, Qwen3MoeConfig field): the experts of a Qwen3-MoE text config (num_experts 0: none). The
# coefficient is read as stated; output_router_logits, transformers' switch for adding the loss at all, is not
# (InternVL's SFT and MPO scripts leave it as the checkpoint has it for Qwen3-MoE, and Qwen3-30B-A3B's is false): a
# run that wants InternVL's behaviour there sets moe.aux_loss_coef to 0.
MOE_FIELDS = (
    ("num_experts", "num_experts"),
    ("top_k", "num_experts_per_tok"),
    ("intermediate_size", "moe_intermediate_size"),
    ("norm_topk_prob", "norm_topk_prob"),
    ("sparse_step", "decoder_sparse_step"),
    ("mlp_only_layers", "mlp_only_layers"),
    ("aux_loss_coef", "router_aux_loss_coef"),
)
# transformers fields with one value lit_internvl implements: (field, value, why): read, it is required; written, set.
VISION_FIXED = (
    ("hidden_act", "gelu", "InternViT's MLP is GELU"),
    ("use_mean_pooling", True, "false adds a final vision LayerNorm, which InternViT does not have"),
    ("use_absolute_position_embeddings", True, "InternViT has learned absolute positions"),
    ("use_mask_token", False, "a masked-image-modelling token"),
)
TOP_FIXED = (
    ("projector_hidden_act", "gelu", "the connector's MLP is GELU"),
    ("vision_feature_select_strategy", "default", "only 'default': drop the cls token"),
)
TEXT_FIXED = {
    "qwen2": (("hidden_act", "silu", "the decoder's MLP is SwiGLU"), ("use_sliding_window", False, "full attention")),
    "llama": (
        ("hidden_act", "silu", "the decoder's MLP is SwiGLU"),
        ("attention_bias", False, "a bias on o_proj too, which the decoder lacks"),
        ("mlp_bias", False, "the decoder's MLP has no biases"),
    ),
}
_QWEN3_FIXED = (
    ("hidden_act", "silu", "the decoder's MLP is SwiGLU"),
    ("attention_bias", False, "biases on q/k/v and o_proj, which the decoder lacks"),
    ("use_sliding_window", False, "full attention"),
)
TEXT_FIXED.update({"qwen3": _QWEN3_FIXED, "qwen3_moe": _QWEN3_FIXED})
# The transformers config class of each text model type (imported when read).
TEXT_CONFIG_CLASSES = {
    "qwen2": "Qwen2Config", "llama": "LlamaConfig", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig",
}  # fmt: skip

# OpenGVLab's own configs, read into the tables' transformers fields. InternVisionConfig: field → (its key, default).
OPENGVLAB_VISION = {
    "hidden_size": ("hidden_size", 3200),
    "num_hidden_layers": ("num_hidden_layers", 48),
    "num_attention_heads": ("num_attention_heads", 25),
    "intermediate_size": ("intermediate_size", 12800),
    "norm_type": ("norm_type", "rms_norm"),
    "layer_norm_eps": ("layer_norm_eps", 1e-6),
    "attention_bias": ("qkv_bias", False),
    "use_qk_norm": ("qk_normalization", True),
    "layer_scale_init_value": ("initializer_factor", 0.1),
}
# InternLM2Config (remote code, so read from the dict) has the LLaMA keys; these are its defaults.
INTERNLM2_DEFAULTS = {
    "vocab_size": 103168, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": None, "intermediate_size": 11008, "rms_norm_eps": 1e-6,
}  # fmt: skip
TEXT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "internlm2"}
TEXT_ARCHITECTURES.update({"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"})

# GPT-OSS (transformers' GptOssConfig, gpt_oss/configuration_gpt_oss.py): the experts' fields (MoEConfig field, its
# field), and the one value of the others lit_internvl implements. Every layer has experts; q/k/v/o share one bias flag.
GPT_OSS_MOE_FIELDS = (
    ("num_experts", "num_local_experts"),
    ("top_k", "num_experts_per_tok"),
    ("intermediate_size", "intermediate_size"),
    ("aux_loss_coef", "router_aux_loss_coef"),
    ("swiglu_limit", "swiglu_limit"),
    ("swiglu_alpha", "swiglu_alpha"),
)
TEXT_FIXED["gpt_oss"] = (("hidden_act", "silu", "GPT-OSS's experts are its clamped SwiGLU"),)
TEXT_ARCHITECTURES["GptOssForCausalLM"] = "gpt_oss"
TEXT_CONFIG_CLASSES["gpt_oss"] = "GptOssConfig"


def _ours(table: tuple[tuple[str, str], ...], theirs: Callable[[str], Any]) -> dict[str, Any]:
    """Our fields by ``table``; ``theirs(name)`` is the value of their field ``name``."""
    return {ours: theirs(name) for ours, name in table}


def _theirs(table: tuple[tuple[str, str], ...], config: object) -> dict[str, Any]:
    """Their fields by ``table`` from our ``config``."""
    return {name: getattr(config, ours) for ours, name in table}


def _require_fixed(config: object, fixed: tuple[tuple[str, Any, str], ...], where: str) -> None:
    for field, value, why in fixed:
        found = getattr(config, field, value)
        implemented = f"lit_internvl implements {json.dumps(value)}: {why}"
        _require(found == value, f"{where}{field}={json.dumps(found, default=str)} ({implemented})")


def _fixed(fixed: tuple[tuple[str, Any, str], ...]) -> dict[str, Any]:
    return {field: value for field, value, _ in fixed}


# -- reading ---------------------------------------------------------------------------------------------------


@dataclass
class CheckpointSpec:
    """What a checkpoint folder's ``config.json`` says, in lit_internvl's terms."""

    vision: InternViTConfig
    language: LanguageConfig
    image_context_id: int | None  # None: an OpenGVLab folder without tokenizer files naming <IMG_CONTEXT>
    downsample_ratio: float
    layout: str  # "transformers" or "opengvlab"
    text_architecture: str  # "qwen2", "llama", "qwen3", "qwen3_moe" or "internlm2"
    template: str | None = None  # OpenGVLab's chat-template name (e.g. "internvl2_5"), when given
    flash: dict | None = None  # InternVL3.5-Flash: its FlashConnector's options (lit_internvl.hf.flash)


def read_config(path: str | Path, image_context_id: int | None = None) -> CheckpointSpec:
    """Map a checkpoint folder's ``config.json`` to lit_internvl configs, without running its code.

    ``image_context_id`` overrides the ``<IMG_CONTEXT>`` id (OpenGVLab configs do not hold it; it is
    read from the folder's tokenizer files).
    """
    folder = checkpoint_folder(path)
    raw = read_json(folder / "config.json")
    _note_remote_code(raw, folder)
    if raw.get("model_type") == "internvl":
        spec = _spec_from_transformers(raw)
    elif raw.get("model_type") == "internvl_chat" or "llm_config" in raw:
        spec = _spec_from_opengvlab(raw, folder, look_up_image_context=image_context_id is None)
    else:
        raise UnsupportedCheckpointError(
            f"{folder}/config.json has model_type {raw.get('model_type')!r}; lit_internvl reads 'internvl' "
            "(transformers' InternVLForConditionalGeneration) and 'internvl_chat' (OpenGVLab's InternVLChatModel)"
        )
    if image_context_id is not None:
        spec.image_context_id = image_context_id
    return spec


def _spec_from_transformers(raw: dict) -> CheckpointSpec:
    from transformers import InternVLConfig

    text_type = (raw.get("text_config") or {}).get("model_type", "qwen2")
    if text_type not in TEXT_FIXED:
        raise UnsupportedCheckpointError(
            f"text_config.model_type {text_type!r} is not supported; lit_internvl maps {sorted(TEXT_FIXED)}"
        )
    config = InternVLConfig.from_dict(_without_remote_code(raw))
    _require_fixed(config, TOP_FIXED, "")
    _require(isinstance(config.vision_feature_layer, int), f"vision_feature_layer {config.vision_feature_layer!r}")
    v = config.vision_config
    _require_fixed(v, VISION_FIXED, "vision_config.")
    _require(
        not v.use_qk_norm or v.layer_norm_eps == 1e-6,
        f"qk-norm with layer_norm_eps {v.layer_norm_eps} (transformers' qk-norm uses 1e-6, InternViT's layer_norm_eps)",
    )
    vision = InternViTConfig(
        **_ours(VISION_FIELDS, partial(getattr, v)),
        image_size=_square(v.image_size, "vision image_size"),
        patch_size=_square(v.patch_size, "vision patch_size"),
        select_layer=config.vision_feature_layer,
    )
    # transformers ties the head to the embeddings by the top-level flag (the text config's is not read).
    language = _language_from_transformers(config.text_config, text_type, tie=bool(config.tie_word_embeddings))
    return CheckpointSpec(vision, language, config.image_token_id, config.downsample_ratio, "transformers", text_type)


def _spec_from_opengvlab(raw: dict, folder: Path, look_up_image_context: bool = True) -> CheckpointSpec:
    vc, llm = raw.get("vision_config") or {}, raw.get("llm_config") or {}
    ps_version = raw.get("ps_version", "v1")  # InternVLChatConfig's default
    _require(ps_version == "v2", f"ps_version {ps_version!r} (only the 'v2' pixel shuffle of InternVL 1.5–3)")
    _require(vc.get("hidden_act", "gelu") == "gelu", f"vision hidden_act {vc.get('hidden_act')!r} (only 'gelu')")
    vision = InternViTConfig(
        **_ours(VISION_FIELDS, lambda name: vc.get(*OPENGVLAB_VISION[name])),
        image_size=raw.get("force_image_size") or vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 14),
        drop_path_rate=vc.get("drop_path_rate", 0.0),
        select_layer=raw.get("select_layer", -1),
    )
    text_type = _opengvlab_text_type(llm)
    # The remote code's tying depends on which flag its transformers version reads: go by the weights.
    names = weight_names(folder)
    tie = not any(name.startswith(("language_model.lm_head.", "language_model.output.")) for name in names)
    if text_type == "internlm2":
        language = _language_from_internlm2(llm, tie)
    else:
        config_class = _text_config_class(text_type)
        language = _language_from_transformers(config_class.from_dict(_without_remote_code(llm)), text_type, tie)
    # OpenGVLab's chat code takes the id from the tokenizer: read it from the tokenizer files.
    image_context_id = token_id(folder, IMG_CONTEXT) if look_up_image_context else None
    downsample_ratio = raw.get("downsample_ratio", 0.5)
    template = raw.get("template")
    flash = flash_options(raw, names, str(folder))
    return CheckpointSpec(vision, language, image_context_id, downsample_ratio, "opengvlab", text_type, template, flash)


def _opengvlab_text_type(llm: dict) -> str:
    architecture = (llm.get("architectures") or [None])[0]
    text_type = TEXT_ARCHITECTURES.get(architecture)
    if text_type is None and llm.get("model_type") in TEXT_ARCHITECTURES.values():
        text_type = llm["model_type"]
    if text_type is None:
        raise UnsupportedCheckpointError(
            f"llm_config architecture {architecture!r} (model_type {llm.get('model_type')!r}) is not supported; "
            f"lit_internvl maps {sorted(TEXT_ARCHITECTURES)}"
        )
    return text_type


def _text_config_class(text_type: str):
    import transformers

    return getattr(transformers, TEXT_CONFIG_CLASSES[text_type])


def _language_from_transformers(text, text_type: str, tie: bool) -> LanguageConfig:
    """A transformers ``Qwen2Config``/``LlamaConfig``/``Qwen3Config``/``Qwen3MoeConfig``/``GptOssConfig`` →
    :class:`LanguageConfig`."""
    _require_fixed(text, TEXT_FIXED[text_type], "text_config.")
    if text_type == "gpt_oss":
        return _language_from_gpt_oss(text, tie)
    moe = None
    if text_type == "qwen3_moe" and text.num_experts:
        moe = MoEConfig(**_ours(MOE_FIELDS, partial(getattr, text)))
    return _language(
        _ours(LANGUAGE_FIELDS, partial(getattr, text)),
        rope_theta=_rope_theta(dict(text.rope_parameters or {}), text.max_position_embeddings),
        rope_scaling=_rope_scaling(dict(text.rope_parameters or {}), text.max_position_embeddings),
        head_dim=getattr(text, "head_dim", None),  # None: hidden_size // num_heads
        qkv_bias=text_type == "qwen2",
        qk_norm=text_type in ("qwen3", "qwen3_moe"),
        moe=moe,
        tie_embeddings=tie,
    )


def _language_from_internlm2(llm: dict, tie: bool) -> LanguageConfig:
    """OpenGVLab's ``InternLM2Config``: the LLaMA keys of the table with InternLM2's defaults."""
    _require(llm.get("hidden_act", "silu") == "silu", f"text hidden_act {llm.get('hidden_act')!r} (only 'silu')")
    _require(not llm.get("bias", True), "InternLM2 bias=true (biases on wqkv and wo; the decoder has no o_proj bias)")
    rope = {"rope_theta": llm.get("rope_theta", 10_000.0), **(llm.get("rope_scaling") or {})}
    return _language(
        _ours(LANGUAGE_FIELDS, lambda name: llm.get(name, INTERNLM2_DEFAULTS[name])),
        rope_theta=_rope_theta(rope, llm.get("max_position_embeddings", 2048)),
        rope_scaling=_rope_scaling(rope, llm.get("max_position_embeddings", 2048)),
        qkv_bias=False,
        tie_embeddings=tie,
    )


def _language_from_gpt_oss(text, tie: bool) -> LanguageConfig:
    """transformers' ``GptOssConfig`` (gpt_oss/modeling_gpt_oss.py): sinks in every attention, the windows of its
    ``layer_types``, q/k/v/o biases by ``attention_bias``, experts of style ``"gpt_oss"`` in every layer."""
    layer_types = tuple(text.layer_types)
    sliding = "sliding_attention" in layer_types
    rope = dict(text.rope_parameters or {})
    return _language(
        _ours(LANGUAGE_FIELDS, partial(getattr, text)),
        head_dim=text.head_dim,
        rope_theta=_rope_theta(rope, text.max_position_embeddings),
        rope_scaling=_rope_scaling(rope, text.max_position_embeddings),
        qkv_bias=text.attention_bias,
        o_bias=text.attention_bias,
        attention_sinks=True,
        sliding_window=text.sliding_window if sliding else None,
        layer_types=layer_types,
        moe=MoEConfig(**_ours(GPT_OSS_MOE_FIELDS, partial(getattr, text)), style="gpt_oss"),
        tie_embeddings=tie,
    )


def _language(fields: dict[str, Any], **special) -> LanguageConfig:
    fields["num_kv_heads"] = fields["num_kv_heads"] or fields["num_heads"]  # no key/value heads given: MHA
    return LanguageConfig(**fields, **special)


def _rope_theta(rope: dict, max_positions: int) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "dynamic":
        # Dynamic NTK only rescales past max_position_embeddings; below it, it is plain RoPE.
        log.warning(
            "The checkpoint uses dynamic NTK rope scaling (factor %s): loaded as plain RoPE, exact for sequences up "
            "to max_position_embeddings=%s and not rescaled beyond", rope.get("factor"), max_positions,
        )  # fmt: skip
    elif kind not in (None, "default", "yarn"):  # YaRN: _rope_scaling
        raise UnsupportedCheckpointError(
            f"Rope scaling {kind!r} is not supported (only none, 'dynamic' and 'yarn'): {rope}"
        )
    return float(rope.get("rope_theta", 10_000.0))


def _rope_scaling(rope: dict, max_positions: int) -> RopeScaling | None:
    """YaRN's parameters (transformers' ``_compute_yarn_parameters``), or None for another kind."""
    if rope.get("rope_type", rope.get("type")) != "yarn":
        return None
    for key in ("mscale", "mscale_all_dim"):
        _require(not rope.get(key), f"YaRN with {key}={rope.get(key)} (DeepSeek's attention factor)")
    _require(
        rope.get("partial_rotary_factor", 1.0) == 1.0, f"partial_rotary_factor {rope.get('partial_rotary_factor')}"
    )
    original = rope["original_max_position_embeddings"]
    return RopeScaling(
        factor=rope.get("factor") or max_positions / original,  # transformers' default for a missing factor
        original_max_position_embeddings=original,
        beta_fast=rope.get("beta_fast") or 32.0,
        beta_slow=rope.get("beta_slow") or 1.0,
        truncate=rope.get("truncate", True),
        attention_factor=rope.get("attention_factor"),
    )


def _note_remote_code(raw: dict, folder: Path) -> None:
    sections = {"": raw, "vision_config.": raw.get("vision_config") or {}, "llm_config.": raw.get("llm_config") or {}}
    entries = [f"{where}auto_map" for where, section in sections.items() if "auto_map" in section]
    if entries or list(folder.glob("*.py")):
        log.info(
            "%s: remote code (%s) ignored; lit_internvl maps config.json itself and imports nothing from the folder",
            folder, ", ".join(entries) or "*.py files",
        )  # fmt: skip


def _without_remote_code(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in ("auto_map", "trust_remote_code")}


def _square(size, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UnsupportedCheckpointError(f"{what} {list(size)} is not square")
        size = size[0]
    return int(size)


def _require(condition: bool, feature: str) -> None:
    if not condition:
        raise UnsupportedCheckpointError(f"Unsupported checkpoint feature: {feature}")


# -- writing ---------------------------------------------------------------------------------------------------


def transformers_config(model: VisionLanguageModel, max_position_embeddings: int = 32768, tile_size: int | None = None):
    """The ``InternVLConfig`` of ``model`` (InternViT + PixelShuffleMLP + Decoder) for ``tile_size`` px tiles
    (default ``model.tile_size``); the text config is Qwen3-MoE's when the decoder has experts, Qwen3's when it has
    qk-norm, Qwen2's when it has qkv bias, LLaMA's otherwise (:func:`text_model_type`)."""
    from transformers import InternVLConfig

    _check_exportable(model)
    tile_size = export_tile_size(model, tile_size)
    vision, language = model.vision.config, model.decoder.config
    config = InternVLConfig(
        vision_config=_vision_config(vision, tile_size),
        text_config=_text_config(language, max_position_embeddings),
        image_token_id=model.image_context_id,
        image_seq_length=model.budgets(tile_size)[0],
        downsample_ratio=1 / model.connector.factor,
        vision_feature_layer=vision.select_layer,
        tie_word_embeddings=language.tie_embeddings,
        **_fixed(TOP_FIXED),
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def export_tile_size(model: VisionLanguageModel, tile_size: int | None) -> int:
    """``tile_size`` (default ``model.tile_size``), checked to give a whole grid the pixel shuffle can halve."""
    tile_size = tile_size or model.tile_size
    step = model.vision.config.patch_size * model.connector.factor
    if tile_size % step:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size × pixel-shuffle factor = {step}")
    return tile_size


def _check_exportable(model: VisionLanguageModel) -> None:
    for what, expected in (("vision", InternViT), ("connector", PixelShuffleMLP), ("decoder", Decoder)):
        if not isinstance(getattr(model, what), expected):
            raise ValueError(f"Export needs a {expected.__name__} {what}, got {type(getattr(model, what)).__name__}")
    if not isinstance(model.image_context_id, int) or model.image_context_id < 0:
        raise ValueError(f"Export needs the model's <IMG_CONTEXT> id, got {model.image_context_id!r}")
    if model.connector.norm.eps != 1e-5:
        eps = model.connector.norm.eps
        raise ValueError(f"transformers' projector LayerNorm has eps 1e-5; the connector has {eps}")
    vision = model.vision.config
    if vision.qk_norm and vision.norm_eps != 1e-6:
        raise ValueError(f"transformers' vision qk-norm uses eps 1e-6; InternViT has norm_eps {vision.norm_eps}")
    if vision.select_layer != -1:
        log.warning(
            "vision_feature_layer %d: transformers 5.24 runs only -1 (its get_image_features fails otherwise)",
            vision.select_layer,
        )


def _vision_config(vision: InternViTConfig, tile_size: int):
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(
        **_theirs(VISION_FIELDS, vision),
        image_size=[tile_size, tile_size],
        patch_size=[vision.patch_size, vision.patch_size],
        **_fixed(VISION_FIXED),
    )


def text_model_type(language: LanguageConfig) -> str:
    """The transformers text model that computes what ``language`` describes: ``"gpt_oss"`` (:func:`is_gpt_oss`),
    ``"qwen3_moe"``, ``"qwen3"``, ``"qwen2"`` or ``"llama"``; a combination none of them has (qk-norm with qkv bias,
    experts without qk-norm) is refused."""
    if is_gpt_oss(language):
        return "gpt_oss"
    if language.moe is not None or language.qk_norm:
        if language.qkv_bias or not language.qk_norm:
            raise ValueError(
                f"No transformers text model has qk_norm={language.qk_norm} and qkv_bias={language.qkv_bias}"
                f"{' with experts' if language.moe else ''}: Qwen3 (and Qwen3-MoE) have qk-norm and no qkv bias"
            )
        return "qwen3_moe" if language.moe is not None else "qwen3"
    return "qwen2" if language.qkv_bias else "llama"


def _text_config(language: LanguageConfig, max_position_embeddings: int):
    text_type = text_model_type(language)
    if text_type == "gpt_oss":
        return _gpt_oss_text_config(language)
    for field, value in (("o_bias", language.o_bias), ("sliding_window", language.sliding_window)):
        if value:
            raise ValueError(f"Export of {field}={value} outside GPT-OSS: {text_type}'s config cannot say it")
    text = dict(
        **_theirs(LANGUAGE_FIELDS, language),
        rope_parameters=_rope_parameters(language),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=language.tie_embeddings,
    )
    # LLaMA and Qwen3 (whose default is 128, and Qwen3-MoE's hidden / heads) always state head_dim; Qwen2 derives it,
    # so it is written only when it differs.
    if language.head_dim != language.hidden_size // language.num_heads or not language.qkv_bias:
        text["head_dim"] = language.head_dim
    if language.moe is not None:
        text.update(_theirs(MOE_FIELDS, language.moe), mlp_only_layers=list(language.moe.mlp_only_layers))
    return _text_config_class(text_type)(**text, **_fixed(TEXT_FIXED[text_type]))


def is_gpt_oss(language: LanguageConfig) -> bool:
    """Whether ``language`` is a GPT-OSS decoder (sinks or GPT-OSS experts), exported as transformers' ``gpt_oss``."""
    return language.attention_sinks or (language.moe is not None and language.moe.style == "gpt_oss")


def _gpt_oss_text_config(language: LanguageConfig):
    """The ``GptOssConfig`` of a GPT-OSS decoder; what GPT-OSS cannot say (a layer without experts or sinks, q/k/v
    biases without an o_proj bias, qk-norm, plain RoPE) is refused."""
    from transformers import GptOssConfig

    moe, scaling = language.moe, language.rope_scaling
    problems = {
        "every attention has sinks": language.attention_sinks,
        "every layer has GPT-OSS experts": moe is not None
        and moe.style == "gpt_oss"
        and moe.sparse_step == 1
        and not moe.mlp_only_layers,
        "q/k/v and o_proj biases go together": language.qkv_bias == language.o_bias,
        "no qk-norm": not getattr(language, "qk_norm", False),
        "YaRN rotary scaling": scaling is not None,
    }
    broken = [rule for rule, holds in problems.items() if not holds]
    if broken:
        raise ValueError(f"Export as transformers' gpt_oss needs: {'; '.join(broken)}")
    return GptOssConfig(
        **{name: value for name, value in _theirs(LANGUAGE_FIELDS, language).items() if name != "intermediate_size"},
        **_theirs(GPT_OSS_MOE_FIELDS, moe),  # GPT-OSS's intermediate_size is the experts' width
        head_dim=language.head_dim,
        attention_bias=language.o_bias,
        sliding_window=language.sliding_window,
        layer_types=list(language.layer_types or ("full_attention",) * language.num_layers),
        rope_parameters=_rope_parameters(language),
        max_position_embeddings=int(scaling.factor * scaling.original_max_position_embeddings),
        tie_word_embeddings=language.tie_embeddings,
        **_fixed(TEXT_FIXED["gpt_oss"]),
    )  # fmt: skip


def _rope_parameters(language: LanguageConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters``: plain RoPE, or YaRN's fields."""
    scaling = language.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": language.rope_theta}
    extra = {} if scaling.attention_factor is None else {"attention_factor": scaling.attention_factor}
    return {
        "rope_type": "yarn", "rope_theta": language.rope_theta, "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings, "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow, "truncate": scaling.truncate, **extra,
    }  # fmt: skip
