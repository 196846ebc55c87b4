"""Real InternVL checkpoints in and out: read a Hugging Face folder into a :class:`VisionLanguageModel`
and export one back to transformers' layout, all of it in this file.

Reading (``load_vlm``, ``read_vlm_state_dict``, ``read_config``) accepts both published layouts:

- transformers-native (``InternVLForConditionalGeneration``, ``model_type: internvl``), with either
  the in-memory names (``model.vision_tower.*``, ``model.language_model.*``, ``lm_head``) or the
  names ``save_pretrained`` writes (``vision_tower.*``, ``language_model.model.*``,
  ``language_model.lm_head``); text model Qwen2 or LLaMA.
- original OpenGVLab (``InternVLChatModel``, ``model_type: internvl_chat``): ``vision_model.*`` with
  fused ``attn.qkv``, projector ``mlp1.{0,1,3}``, text model Qwen2, LLaMA or InternLM2 (its grouped
  ``wqkv`` is split into q/k/v, ``w1/w3/w2`` become gate/up/down).

Nothing from the checkpoint runs: ``config.json`` is read as JSON (``auto_map`` entries are ignored)
and mapped field by field, weights come from safetensors, and a pickle (``.bin``/``.pt``) is read
only if ``torch.load(weights_only=True)`` accepts it. A feature the components do not implement
(rope scaling other than dynamic NTK, biases the blocks lack, sliding windows, ...) is refused with
a message rather than loaded silently wrong.

Writing (``export_vlm``, ``python -m lit_internvl export``) produces what
``InternVLForConditionalGeneration.from_pretrained`` loads: ``config.json``, ``model.safetensors``
(sharded with an index past ``max_shard_bytes``) and the tokenizer files of a tokenizer folder.

Names, lit_internvl ← transformers (as saved) ← OpenGVLab; the tables below hold the details::

    vision.embeddings.class_embedding   vision_tower.embeddings.cls_token           vision_model.embeddings.…
    vision.layers.N.attn.qkv (fused)    vision_tower.encoder.layer.N.attention.     vision_model.encoder.layers.N.
                                          {q,k,v}_proj (split in three)               attn.qkv (same as ours)
    vision.layers.N.{ls1,norm1,…}       ….layer.N.{lambda_1,layernorm_before,…}     ….layers.N.{ls1,norm1,…}
    connector.{norm,fc1,fc2}            multi_modal_projector.{layer_norm,          mlp1.{0,1,3}
                                          linear_1,linear_2}
    decoder.{embed_tokens,layers,norm}  language_model.model.{same}                 language_model.model.{same, or
                                                                                      InternLM2's names}
    decoder.lm_head                     language_model.lm_head                      language_model.{lm_head|output}
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lit_internvl.components.connectors import PixelShuffleMLP
from lit_internvl.components.language import Decoder, LanguageConfig
from lit_internvl.components.vision import InternViT, InternViTConfig
from lit_internvl.models.builders import INTERNVL_PRESETS, internvl, vlm_from_configs
from lit_internvl.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

IMG_CONTEXT = "<IMG_CONTEXT>"

TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a folder has a tokenizer if it has one of these
# Files of a tokenizer folder that travel with an export (never ``.py`` files: no remote code).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip
# Image-processor files: copied only from a transformers-layout folder (OpenGVLab's describe another processor).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

# -- name tables: lit_internvl name → transformers name (OpenGVLab vision names are ours) ----------------------

VISION_EMBEDDINGS = {
    "class_embedding": "cls_token",
    "position_embedding": "position_embeddings",
    "patch_embedding": "patch_embeddings.projection",
}
VISION_LAYER = {
    "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
}
CONNECTOR_TRANSFORMERS = {"norm": "layer_norm", "fc1": "linear_1", "fc2": "linear_2"}
CONNECTOR_OPENGVLAB = {"norm": "0", "fc1": "1", "fc2": "3"}  # mlp1.2 is the GELU
# InternLM2 per-layer names (``attention.wqkv`` is split separately); embeddings and head below.
INTERNLM2_LAYER = {
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
INTERNLM2_TOP = {"embed_tokens": "tok_embeddings"}

# Checkpoint key prefix → part of the model, for every layout (the names never collide).
PARTS = (
    ("model.vision_tower.", "vision"), ("vision_tower.", "vision"), ("vision_model.", "vision"),
    ("model.multi_modal_projector.", "connector"), ("multi_modal_projector.", "connector"), ("mlp1.", "connector"),
    ("model.language_model.", "text"), ("language_model.model.", "text"),
    ("language_model.lm_head.", "lm_head"), ("language_model.output.", "lm_head"), ("lm_head.", "lm_head"),
)  # fmt: skip
TEXT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "internlm2"}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint asks for something lit_internvl's components do not implement."""


@dataclass
class CheckpointSpec:
    """What a checkpoint folder's ``config.json`` says, in lit_internvl's terms."""

    vision: InternViTConfig
    language: LanguageConfig
    image_context_id: int | None  # None: an OpenGVLab folder without tokenizer files naming <IMG_CONTEXT>
    downsample_ratio: float
    layout: str  # "transformers" or "opengvlab"
    text_architecture: str  # "qwen2", "llama" or "internlm2"
    template: str | None = None  # OpenGVLab's chat-template name (e.g. "internvl2_5"), when given


# -- reading ---------------------------------------------------------------------------------------------------


def read_config(path: str | Path, image_context_id: int | None = None) -> CheckpointSpec:
    """Map a checkpoint folder's ``config.json`` to lit_internvl configs, without running its code.

    ``image_context_id`` overrides the ``<IMG_CONTEXT>`` id (OpenGVLab configs do not hold it; it is
    read from the folder's tokenizer files).
    """
    folder = _folder(path)
    raw = _read_json(folder / "config.json")
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


def read_vlm_state_dict(path: str | Path, spec: CheckpointSpec | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under lit_internvl's names (``vision.…``, ``connector.…``, ``decoder.…``),
    in their stored dtype. This is what ``init_from: hf:/path`` loads."""
    folder = _folder(path)
    spec = spec or read_config(folder, image_context_id=-1)  # the weights do not depend on the id
    return _to_ours(_read_tensors(folder), spec, str(folder))


def build_vlm(spec: CheckpointSpec) -> VisionLanguageModel:
    """An (untrained) model with the architecture ``spec`` describes; build it under ``torch.device("meta")``
    to skip the initialisation."""
    return vlm_from_configs(spec.vision, spec.language, spec.image_context_id, spec.downsample_ratio)


def load_vlm(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    image_context_id: int | None = None,
) -> VisionLanguageModel:
    """A :class:`VisionLanguageModel` with a checkpoint folder's weights, in eval mode.

    ``dtype`` casts floating-point weights (default: as stored); every tensor must match the
    architecture the config describes, or the error lists what is missing and what is left over.
    """
    folder = _folder(path)
    spec = read_config(folder, image_context_id)
    if spec.image_context_id is None:
        raise ValueError(f"{folder}: no {IMG_CONTEXT} token in the tokenizer files; pass image_context_id=")
    state = read_vlm_state_dict(folder, spec)
    with torch.device("meta"):
        model = build_vlm(spec)
    load_state_exactly(model, state, str(folder), device=device, dtype=dtype)
    return model.eval()


def load_tokenizer(path: str | Path):
    """The folder's Hugging Face tokenizer (with its chat template, ``tokenizer.chat_template``), loaded
    with ``trust_remote_code=False``."""
    folder = _folder(path)
    if not _has_tokenizer(folder):
        raise FileNotFoundError(f"No tokenizer in {folder}: expected one of {', '.join(TOKENIZER_CORE)}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - every failure gets the same explanation
        raise ValueError(
            f"The tokenizer in {folder} cannot be loaded without running code from the folder "
            f"(trust_remote_code=False): {error}"
        ) from error


def load_state_exactly(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load every tensor of ``model`` from ``state`` (names and shapes must match exactly), assigning the
    tensors so that a model built on the meta device is materialised without a second copy."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model's architecture: "
            f"{len(missing)} missing{_preview(missing)}, {len(unexpected)} unexpected{_preview(unexpected)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            raise ValueError(f"{source}: {name} has shape {shapes}")

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)

    model.load_state_dict({name: cast(tensor) for name, tensor in state.items()}, assign=True)
    # Non-persistent buffers (RoPE frequencies) are not in a checkpoint: re-create those left on meta.
    target = torch.device(device) if device is not None else torch.device("cpu")
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            if not hasattr(module, "reset_parameters"):
                raise ValueError(f"{type(module).__name__} has buffers on the meta device and no reset_parameters()")
            module.to_empty(device=target, recurse=False)
            module.reset_parameters()


# -- config mapping --------------------------------------------------------------------------------------------


def _spec_from_transformers(raw: dict) -> CheckpointSpec:
    from transformers import InternVLConfig

    text_type = (raw.get("text_config") or {}).get("model_type", "qwen2")
    if text_type not in ("qwen2", "llama"):
        raise UnsupportedCheckpointError(
            f"text_config.model_type {text_type!r} is not supported; lit_internvl maps 'qwen2' and 'llama'"
        )
    config = InternVLConfig.from_dict(_without_remote_code(raw))
    _require(config.projector_hidden_act == "gelu", f"projector_hidden_act {config.projector_hidden_act!r}")
    strategy = config.vision_feature_select_strategy
    _require(strategy == "default", f"vision_feature_select_strategy {strategy!r} (only 'default': drop the cls token)")
    _require(isinstance(config.vision_feature_layer, int), f"vision_feature_layer {config.vision_feature_layer!r}")
    v = config.vision_config
    _require(v.hidden_act == "gelu", f"vision hidden_act {v.hidden_act!r} (only 'gelu')")
    _require(v.use_mean_pooling, "use_mean_pooling=false (a final vision LayerNorm, which InternViT does not have)")
    _require(v.use_absolute_position_embeddings, "use_absolute_position_embeddings=false")
    _require(not v.use_mask_token, "use_mask_token=true (a masked-image-modelling token)")
    _require(
        not v.use_qk_norm or v.layer_norm_eps == 1e-6,
        f"qk-norm with layer_norm_eps {v.layer_norm_eps} (transformers' qk-norm uses 1e-6, InternViT's layer_norm_eps)",
    )
    vision = InternViTConfig(
        image_size=_square(v.image_size, "vision image_size"),
        patch_size=_square(v.patch_size, "vision patch_size"),
        hidden_size=v.hidden_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        norm_type=v.norm_type,
        norm_eps=v.layer_norm_eps,
        qkv_bias=v.attention_bias,
        qk_norm=v.use_qk_norm,
        layer_scale_init=v.layer_scale_init_value,
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
    # Defaults are those of OpenGVLab's InternVisionConfig.
    vision = InternViTConfig(
        image_size=raw.get("force_image_size") or vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 14),
        hidden_size=vc.get("hidden_size", 3200),
        num_layers=vc.get("num_hidden_layers", 48),
        num_heads=vc.get("num_attention_heads", 25),
        intermediate_size=vc.get("intermediate_size", 12800),
        norm_type=vc.get("norm_type", "rms_norm"),
        norm_eps=vc.get("layer_norm_eps", 1e-6),
        qkv_bias=vc.get("qkv_bias", False),
        qk_norm=vc.get("qk_normalization", True),
        layer_scale_init=vc.get("initializer_factor", 0.1),
        drop_path_rate=vc.get("drop_path_rate", 0.0),
        select_layer=raw.get("select_layer", -1),
    )
    architecture = (llm.get("architectures") or [None])[0]
    text_type = TEXT_ARCHITECTURES.get(architecture)
    if text_type is None and llm.get("model_type") in TEXT_ARCHITECTURES.values():
        text_type = llm["model_type"]
    if text_type is None:
        raise UnsupportedCheckpointError(
            f"llm_config architecture {architecture!r} (model_type {llm.get('model_type')!r}) is not supported; "
            f"lit_internvl maps {sorted(TEXT_ARCHITECTURES)}"
        )
    # The remote code's tying depends on which flag its transformers version reads: go by the weights.
    names = _weight_names(folder)
    tie = not any(name.startswith(("language_model.lm_head.", "language_model.output.")) for name in names)
    if text_type == "internlm2":
        language = _language_from_internlm2(llm, tie)
    else:
        from transformers import LlamaConfig, Qwen2Config

        config_class = Qwen2Config if text_type == "qwen2" else LlamaConfig
        language = _language_from_transformers(config_class.from_dict(_without_remote_code(llm)), text_type, tie)
    # OpenGVLab's chat code takes the id from the tokenizer: read it from the tokenizer files.
    image_context_id = _token_id(folder, IMG_CONTEXT) if look_up_image_context else None
    downsample_ratio = raw.get("downsample_ratio", 0.5)
    return CheckpointSpec(vision, language, image_context_id, downsample_ratio, "opengvlab", text_type, raw.get("template"))


def _language_from_transformers(text, text_type: str, tie: bool) -> LanguageConfig:
    """A transformers ``Qwen2Config``/``LlamaConfig`` → :class:`LanguageConfig`."""
    _require(text.hidden_act == "silu", f"text hidden_act {text.hidden_act!r} (only 'silu')")
    if text_type == "llama":
        _require(not text.attention_bias, "LLaMA attention_bias=true (a bias on o_proj too, which the decoder lacks)")
        _require(not text.mlp_bias, "LLaMA mlp_bias=true")
    else:
        _require(not getattr(text, "use_sliding_window", False), "Qwen2 use_sliding_window=true")
    heads = text.num_attention_heads
    return LanguageConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=text.num_key_value_heads or heads,
        intermediate_size=text.intermediate_size,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        norm_eps=text.rms_norm_eps,
        rope_theta=_rope_theta(dict(text.rope_parameters or {}), text.max_position_embeddings),
        qkv_bias=text_type == "qwen2",
        tie_embeddings=tie,
    )


def _language_from_internlm2(llm: dict, tie: bool) -> LanguageConfig:
    """OpenGVLab's ``InternLM2Config`` (remote code, so read from the dict; defaults are its own)."""
    _require(llm.get("hidden_act", "silu") == "silu", f"text hidden_act {llm.get('hidden_act')!r} (only 'silu')")
    _require(not llm.get("bias", True), "InternLM2 bias=true (biases on wqkv and wo; the decoder has no o_proj bias)")
    heads = llm.get("num_attention_heads", 32)
    rope = {"rope_theta": llm.get("rope_theta", 10_000.0), **(llm.get("rope_scaling") or {})}
    return LanguageConfig(
        vocab_size=llm.get("vocab_size", 103168),
        hidden_size=llm.get("hidden_size", 4096),
        num_layers=llm.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=llm.get("num_key_value_heads") or heads,
        intermediate_size=llm.get("intermediate_size", 11008),
        norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(rope, llm.get("max_position_embeddings", 2048)),
        qkv_bias=False,
        tie_embeddings=tie,
    )


def _rope_theta(rope: dict, max_positions: int) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "dynamic":
        # Dynamic NTK only rescales past max_position_embeddings; below it, it is plain RoPE.
        log.warning(
            "The checkpoint uses dynamic NTK rope scaling (factor %s): loaded as plain RoPE, exact for sequences up "
            "to max_position_embeddings=%s and not rescaled beyond", rope.get("factor"), max_positions,
        )  # fmt: skip
    elif kind not in (None, "default"):
        raise UnsupportedCheckpointError(f"Rope scaling {kind!r} is not supported (only none and 'dynamic'): {rope}")
    return float(rope.get("rope_theta", 10_000.0))


# -- weight mapping --------------------------------------------------------------------------------------------


def _to_ours(raw: Mapping[str, torch.Tensor], spec: CheckpointSpec, source: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (any layout) → lit_internvl names; fused and split projections converted."""
    vision_layer, vision_embeddings = _inverse(VISION_LAYER), _inverse(VISION_EMBEDDINGS)
    connector = {**_inverse(CONNECTOR_TRANSFORMERS), **_inverse(CONNECTOR_OPENGVLAB)}
    out: dict[str, torch.Tensor] = {}
    to_fuse: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    for key, tensor in raw.items():
        if key.endswith("rotary_emb.inv_freq"):  # recomputed, never loaded
            continue
        part, rest = _split_part(key)
        name = None
        if part == "vision":
            layer = re.fullmatch(r"encoder\.layers?\.(\d+)\.(.+)", rest)
            if layer:
                index, sub = layer.groups()
                qkv = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", sub)
                if qkv:
                    to_fuse[f"vision.layers.{index}.attn.qkv.{qkv.group(2)}"][qkv.group(1)] = tensor
                    continue
                name = f"vision.layers.{index}.{_rename(sub, vision_layer) or sub}"
            elif rest.startswith("embeddings."):
                sub = rest[len("embeddings.") :]
                name = f"vision.embeddings.{_rename(sub, vision_embeddings) or sub}"
        elif part == "connector":
            sub = _rename(rest, connector)
            name = sub and f"connector.{sub}"
        elif part == "text":
            if spec.text_architecture == "internlm2":
                wqkv = re.fullmatch(r"layers\.(\d+)\.attention\.wqkv\.weight", rest)
                if wqkv:
                    q, k, v = split_wqkv(tensor, spec.language)
                    for proj, value in zip("qkv", (q, k, v)):
                        out[f"decoder.layers.{wqkv.group(1)}.self_attn.{proj}_proj.weight"] = value
                    continue
                rest = _rename_layer(rest, _inverse(INTERNLM2_LAYER)) or _rename(rest, _inverse(INTERNLM2_TOP)) or rest
            name = f"decoder.{rest}"
        elif part == "lm_head":
            name = f"decoder.lm_head.{rest}"
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise UnsupportedCheckpointError(f"{source}: {len(unknown)} tensor(s) have no lit_internvl name{_preview(unknown)}")
    for name, parts in to_fuse.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: {name} needs q, k and v projections, found only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if spec.language.tie_embeddings and "decoder.lm_head.weight" in out:
        head = out.pop("decoder.lm_head.weight")
        if not torch.equal(head, out.get("decoder.embed_tokens.weight", head)):
            log.warning("%s: the config ties the LM head to the embeddings; the stored lm_head is ignored", source)
    return out


def split_wqkv(wqkv: torch.Tensor, config: LanguageConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused ``wqkv`` ``(kv_heads·(g+2)·head_dim, hidden)`` → q, k, v weights.

    The rows are grouped per key/value head as ``[q_1 … q_g, k, v]`` with ``g = heads / kv_heads``.
    """
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    groups = config.num_heads // kv_heads
    expected = kv_heads * (groups + 2) * head_dim
    if wqkv.shape[0] != expected:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected {kv_heads}·({groups}+2)·{head_dim} = {expected}")
    grouped = wqkv.reshape(kv_heads, groups + 2, head_dim, -1)
    q = grouped[:, :groups].reshape(kv_heads * groups * head_dim, -1)
    k = grouped[:, groups].reshape(kv_heads * head_dim, -1)
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def to_transformers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lit_internvl names → the names transformers' ``save_pretrained`` writes for InternVL."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        layer = re.fullmatch(r"vision\.layers\.(\d+)\.(.+)", name)
        if layer:
            index, sub = layer.groups()
            prefix = f"vision_tower.encoder.layer.{index}."
            if sub in ("attn.qkv.weight", "attn.qkv.bias"):
                leaf = sub.rsplit(".", 1)[1]
                for proj, part in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"{prefix}attention.{proj}_proj.{leaf}"] = part.clone()
                continue
            new = _rename(sub, VISION_LAYER)
            new = new and prefix + new
        elif name.startswith("vision.embeddings."):
            new = _rename(name[len("vision.embeddings.") :], VISION_EMBEDDINGS)
            new = new and "vision_tower.embeddings." + new
        elif name.startswith("connector."):
            new = _rename(name[len("connector.") :], CONNECTOR_TRANSFORMERS)
            new = new and "multi_modal_projector." + new
        elif name.startswith("decoder.lm_head."):
            new = "language_model.lm_head." + name[len("decoder.lm_head.") :]
        elif name.startswith("decoder."):
            new = "language_model.model." + name[len("decoder.") :]
        else:
            new = None
        if new is None:
            raise ValueError(f"{name} has no name in transformers' InternVL layout")
        out[new] = tensor.contiguous()
    return out


def _split_part(key: str) -> tuple[str | None, str]:
    for prefix, part in PARTS:
        if key.startswith(prefix):
            return part, key[len(prefix) :]
    return None, key


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """Replace the table entry that matches whole leading dotted segments of ``name``; None if none does."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


def _rename_layer(name: str, table: Mapping[str, str]) -> str | None:
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if layer:
        sub = _rename(layer.group(2), table)
        return sub and f"layers.{layer.group(1)}.{sub}"
    return None


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


# -- files -----------------------------------------------------------------------------------------------------


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: safetensors (single file or sharded index) first, else plain-tensor pickles."""
    from safetensors.torch import load_file

    files = _safetensors_files(folder)
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(str(file)))
        return tensors
    pickles = _pickle_files(folder)
    if not pickles:
        raise FileNotFoundError(f"No weights in {folder}: expected *.safetensors (or a plain-tensor pytorch_model.bin)")
    tensors = {}
    for file in pickles:
        tensors.update(_read_pickle(file))
    return tensors


def _weight_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return list(_read_json(index)["weight_map"])
    files = _safetensors_files(folder)
    if files:
        names: list[str] = []
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names.extend(handle.keys())
        return names
    return [name for file in _pickle_files(folder) for name in _read_pickle(file)]


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def _pickle_files(folder: Path) -> list[Path]:
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    files = (file for pattern in ("*.bin", "*.pt", "*.pth") for file in folder.glob(pattern))
    return sorted(file for file in files if file.name != "training_args.bin")


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:  # mmap (no copy) works for the zip format of torch.save only
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as error:  # noqa: BLE001 - any refusal of the restricted unpickler ends here
        raise UnsupportedCheckpointError(
            f"{file} is a pickle that torch.load(weights_only=True) refuses, so it was not read: lit_internvl never "
            f"unpickles arbitrary objects. Convert it to safetensors with a tool you trust. ({error})"
        ) from error
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise UnsupportedCheckpointError(f"{file} holds no state dict")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _read_json(file: Path) -> dict:
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def _folder(path: str | Path) -> Path:
    folder = Path(str(path).removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (config.json + weights)")
    return folder


def _token_id(folder: Path, token: str) -> int | None:
    """A special token's id from the tokenizer files, read as JSON (no tokenizer code runs)."""
    added = folder / "added_tokens.json"
    if added.exists() and token in (table := _read_json(added)):
        return int(table[token])
    config = folder / "tokenizer_config.json"
    if config.exists():
        for index, entry in (_read_json(config).get("added_tokens_decoder") or {}).items():
            if entry.get("content") == token:
                return int(index)
    fast = folder / "tokenizer.json"
    if fast.exists():
        for entry in _read_json(fast).get("added_tokens") or []:
            if entry.get("content") == token:
                return int(entry["id"])
    return None


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


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    return f" [{', '.join(keys[:limit])}{', …' if len(keys) > limit else ''}]"


# -- writing ---------------------------------------------------------------------------------------------------


def transformers_config(model: VisionLanguageModel, max_position_embeddings: int = 32768):
    """The ``InternVLConfig`` of ``model`` (InternViT + PixelShuffleMLP + Decoder); Qwen2 text config
    when the decoder has qkv bias, LLaMA otherwise."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    for what, expected in (("vision", InternViT), ("connector", PixelShuffleMLP), ("decoder", Decoder)):
        if not isinstance(getattr(model, what), expected):
            raise ValueError(f"Export needs a {expected.__name__} {what}, got {type(getattr(model, what)).__name__}")
    vision, language = model.vision.config, model.decoder.config
    if not isinstance(model.image_context_id, int) or model.image_context_id < 0:
        raise ValueError(f"Export needs the model's <IMG_CONTEXT> id, got {model.image_context_id!r}")
    if model.connector.norm.eps != 1e-5:
        raise ValueError(f"transformers' projector LayerNorm has eps 1e-5; the connector has {model.connector.norm.eps}")
    if vision.qk_norm and vision.norm_eps != 1e-6:
        raise ValueError(f"transformers' vision qk-norm uses eps 1e-6; InternViT has norm_eps {vision.norm_eps}")
    if vision.select_layer != -1:
        log.warning(
            "vision_feature_layer %d: transformers 5.24 runs only -1 (its get_image_features fails otherwise)",
            vision.select_layer,
        )
    vision_config = InternVLVisionConfig(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        intermediate_size=vision.intermediate_size,
        attention_bias=vision.qkv_bias,
        use_qk_norm=vision.qk_norm,
        norm_type=vision.norm_type,
        layer_norm_eps=vision.norm_eps,
        image_size=[vision.image_size, vision.image_size],
        patch_size=[vision.patch_size, vision.patch_size],
        layer_scale_init_value=vision.layer_scale_init,
        hidden_act="gelu",
        use_mean_pooling=True,
    )
    text = dict(
        vocab_size=language.vocab_size,
        hidden_size=language.hidden_size,
        intermediate_size=language.intermediate_size,
        num_hidden_layers=language.num_layers,
        num_attention_heads=language.num_heads,
        num_key_value_heads=language.num_kv_heads,
        rms_norm_eps=language.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": language.rope_theta},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=language.tie_embeddings,
        hidden_act="silu",
    )
    if language.head_dim != language.hidden_size // language.num_heads or not language.qkv_bias:
        text["head_dim"] = language.head_dim
    if language.qkv_bias:
        text_config = Qwen2Config(**text)
    else:
        text_config = LlamaConfig(attention_bias=False, mlp_bias=False, **text)
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=model.image_context_id,
        image_seq_length=model.tokens_per_tile,
        downsample_ratio=1 / model.connector.factor,
        projector_hidden_act="gelu",
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=language.tie_embeddings,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def export_vlm(
    model: VisionLanguageModel,
    output_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``model`` in transformers' InternVL layout; ``InternVLForConditionalGeneration.from_pretrained``
    loads the folder. Tokenizer files are copied from ``tokenizer_dir`` when given."""
    state = model.state_dict()
    refuse_lora(state)
    config = transformers_config(model)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = str(dtypes.pop()).removeprefix("torch.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output))
    _save_sharded({k: v.cpu() for k, v in to_transformers_state_dict(state).items()}, output, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, output)
    return output


def refuse_lora(state: Mapping[str, torch.Tensor]) -> None:
    """The hook for LoRA: adapters must be merged (peft's ``merge_and_unload``) before an export."""
    lora = [name for name in state if "lora_" in name]
    if lora:
        raise ValueError(
            f"The checkpoint holds {len(lora)} LoRA tensor(s){_preview(lora)}: merge the adapters into the base "
            "weights first (peft's merge_and_unload), then export the merged model"
        )


def copy_tokenizer_files(tokenizer_dir: str | Path, output: Path) -> list[str]:
    source = _folder(tokenizer_dir)
    names = list(TOKENIZER_FILES)
    if (source / "config.json").exists() and _read_json(source / "config.json").get("model_type") == "internvl":
        names += PROCESSOR_FILES
    if not _has_tokenizer(source):
        raise FileNotFoundError(f"No tokenizer in {source}: expected one of {', '.join(TOKENIZER_CORE)}")
    copied = [name for name in names if (source / name).exists()]
    for name in copied:
        shutil.copyfile(source / name, output / name)
    return copied


def _save_sharded(state: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(output / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(output / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)


# -- command line ----------------------------------------------------------------------------------------------


def export_main(argv: list[str]) -> Path:
    """``python -m lit_internvl export --checkpoint CKPT --output DIR [--arch NAME|DIR] [--tokenizer DIR]``."""
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
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    source = Path(args.checkpoint.removeprefix("hf:"))
    if source.is_dir():
        model = load_vlm(source, dtype=dtype)
        tokenizer = args.tokenizer or source
    else:
        if not args.arch:
            parser.error("--arch is needed for a .ckpt/.safetensors: a preset name or the Hugging Face folder it came from")
        model = _model_from_weights(source, args.arch, dtype)
        arch_dir = Path(args.arch.removeprefix("hf:"))
        tokenizer = args.tokenizer or (arch_dir if arch_dir.is_dir() else None)
    if tokenizer is not None and args.tokenizer is None and not _has_tokenizer(Path(tokenizer)):
        log.warning("%s has no tokenizer files; exporting the weights and config only", tokenizer)
        tokenizer = None
    output = export_vlm(model, args.output, tokenizer)
    count = sum(p.numel() for p in model.parameters())
    print(f"Exported {count:,} parameters to {output} (transformers' InternVL layout)")
    return output


def _model_from_weights(source: Path, arch: str, dtype: torch.dtype | None) -> VisionLanguageModel:
    from lit_internvl.checkpoints import read_state_dict

    state = read_state_dict(str(source))  # drops the LightningModule's "model." prefix
    refuse_lora(state)
    arch_dir = Path(arch.removeprefix("hf:"))
    with torch.device("meta"):
        model = build_vlm(read_config(arch_dir)) if arch_dir.is_dir() else internvl(arch)
    own = tuple(f"{name}." for name, _ in model.named_children())
    extra = [name for name in state if not name.startswith(own)]
    if extra:
        log.info("%s: %d tensor(s) outside the model ignored%s", source, len(extra), _preview(extra))
    load_state_exactly(model, {k: v for k, v in state.items() if k.startswith(own)}, str(source), dtype=dtype)
    return model.eval()


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in TOKENIZER_CORE)
