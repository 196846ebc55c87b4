"""InternVL 1's released dual encoders (``OpenGVLab/InternVL-14B-224px``: InternViT-6B + QLLaMA) in and out of
lit_internvl: InternVL-C as a :class:`~lit_internvl.models.dual_encoder.DualEncoder` with a causal last-token
text tower, InternVL-G as :class:`~lit_internvl.models.qllama.InternVLG`.

The folder is read as data, never run: ``config.json`` (``InternVLConfig`` of the remote code: ``vision_config``,
``qllama_config``, ``clip_embed_dim``, ``attn_pool_num_heads``, ``num_query_token``,
``cross_attention_frequency``, ``force_image_size``) as JSON, the weights from safetensors or plain-tensor
pickles. Names, released → lit_internvl (InternVL-G; InternVL-C takes the parts it has)::

    vision_model.embeddings.* / .encoder.layers.N.*    vision.embeddings.* / vision.layers.N.* (same leaves)
    clip_projector.*                                   image_projection.*  (AttentionPool, same leaves)
    clip_projector2.*                                  query_projection.*
    qllama.model.{embed_tokens,layers.N.*,norm}        qllama.{same}        (C: text_encoder.{same}, no cross_attn)
    qllama.lm_head.weight                              qllama.lm_head.weight
    query_tokens (1, Q, D)                             qllama.query_tokens (Q, D)
    text_projection (D, E), used as ``x @ P``          text_projection.weight (E, D) = Pᵀ
    itm_head.*, logit_scale                            itm_head.*, logit_scale

The reference (clip_benchmark/clip_benchmark/models/internvl_huggingface/modeling_internvl.py) resizes the
position table to ``force_image_size`` at load (``resize_pos_embeddings``); so does :func:`load_internvl1`.
Its QLLaMA's rotary embedding uses base 10,000 whatever the config says (modeling_qllama.py,
``LlamaRotaryEmbedding = FixedLlamaRotaryEmbedding`` built without ``base``); so does the trunk built here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from lit_internvl.components.language import LanguageConfig, TextEncoder
from lit_internvl.components.vision import InternViT, InternViTConfig
from lit_internvl.hf.config import OPENGVLAB_VISION, VISION_FIELDS, _language_from_transformers, _ours
from lit_internvl.hf.files import UnsupportedCheckpointError, checkpoint_folder, read_json, read_tensors
from lit_internvl.hf.names import _our_name, preview
from lit_internvl.models.dual_encoder import DualEncoder
from lit_internvl.models.qllama import InternVLG, QLLaMA

log = logging.getLogger(__name__)

Kind = Literal["c", "g"]
# Released tensors InternVL-C has no use for (the G-only parts).
G_ONLY_PREFIXES = ("clip_projector2.", "itm_head.", "query_tokens", "qllama.lm_head.")


@dataclass
class InternVL1Spec:
    """What an InternVL 1 ``config.json`` says, in lit_internvl's terms."""

    vision: InternViTConfig
    language: LanguageConfig
    embed_dim: int
    attn_pool_heads: int
    num_queries: int
    cross_attention_every: int
    image_size: int  # the size the model reads: force_image_size, else the vision config's


def is_internvl1(folder: str | Path) -> bool:
    """A folder of InternVL 1's dual encoder (its config has a ``qllama_config``)."""
    config = Path(folder) / "config.json"
    return config.is_file() and "qllama_config" in read_json(config)


def read_internvl1_config(path: str | Path) -> InternVL1Spec:
    folder = checkpoint_folder(path)
    raw = read_json(folder / "config.json")
    if "qllama_config" not in raw:
        raise UnsupportedCheckpointError(f"{folder}/config.json has no qllama_config: not an InternVL 1 (C/G) model")
    for lora in ("use_backbone_lora", "use_qllama_lora"):
        if raw.get(lora):
            raise UnsupportedCheckpointError(
                f"{folder}: {lora}={raw[lora]}: merge the LoRA adapters into the weights first (peft's merge_and_unload)"
            )
    vc = raw.get("vision_config") or {}
    native = vc.get("image_size", 224)
    vision = InternViTConfig(
        **_ours(VISION_FIELDS, lambda name: vc.get(*OPENGVLAB_VISION[name])),
        image_size=native,
        patch_size=vc.get("patch_size", 14),
        drop_path_rate=vc.get("drop_path_rate", 0.0),
    )
    from transformers import LlamaConfig

    qllama = LlamaConfig.from_dict({k: v for k, v in raw["qllama_config"].items() if k != "auto_map"})
    language = replace(_language_from_transformers(qllama, "llama", tie=False), rope_theta=10_000.0)
    return InternVL1Spec(
        vision=vision,
        language=language,
        embed_dim=raw.get("clip_embed_dim", 768),
        attn_pool_heads=raw.get("attn_pool_num_heads", 16),
        num_queries=raw.get("num_query_token", 96),
        cross_attention_every=raw.get("cross_attention_frequency", 2),
        image_size=raw.get("force_image_size") or native,
    )


def build_internvl1(spec: InternVL1Spec, kind: Kind = "g") -> nn.Module:
    """The (untrained) InternVL-C or -G of ``spec`` at its native image size (load, then resize)."""
    vision = InternViT(spec.vision)
    if kind == "c":
        text = TextEncoder(spec.language, pooling="last", causal=True)
        return DualEncoder(vision, text, spec.embed_dim, "attention", attn_pool_heads=spec.attn_pool_heads)
    if kind != "g":
        raise ValueError(f"Unknown InternVL 1 model {kind!r}; choose 'c' (InternVL-C) or 'g' (InternVL-G)")
    qllama = QLLaMA(
        spec.vision.hidden_size, spec.language, spec.num_queries, spec.cross_attention_every, text_attention="causal"
    )
    return InternVLG(
        vision, qllama, spec.embed_dim, "attention", "last", query_pooling="attention",
        attn_pool_heads=spec.attn_pool_heads,
    )  # fmt: skip


def internvl1_to_ours(raw: Mapping[str, torch.Tensor], kind: Kind = "g", source: str = "") -> dict[str, torch.Tensor]:
    """Released tensors → lit_internvl names of InternVL-G (``kind="g"``) or InternVL-C (``"c"``: the G-only
    tensors and the cross-attention are left out, and logged)."""
    out: dict[str, torch.Tensor] = {}
    unknown, unused = [], []
    text = "qllama." if kind == "g" else "text_encoder."
    for key, tensor in raw.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if kind == "c" and (
            key.startswith(G_ONLY_PREFIXES) or key.startswith("qllama.model.") and ".cross_attn." in key
        ):
            unused.append(key)
            continue
        if key.startswith("vision_model."):
            name = _our_name("vision", key[len("vision_model.") :], internlm2=False)
        elif key.startswith("qllama.model."):
            name = text + key[len("qllama.model.") :]
        elif key == "qllama.lm_head.weight":
            name = "qllama.lm_head.weight"
        elif key == "query_tokens":
            name, tensor = "qllama.query_tokens", tensor.reshape(tensor.shape[-2], tensor.shape[-1])
        elif key == "text_projection":
            name, tensor = "text_projection.weight", tensor.T.contiguous()
        elif key.startswith("clip_projector2."):
            name = "query_projection." + key[len("clip_projector2.") :]
        elif key.startswith("clip_projector."):
            name = "image_projection." + key[len("clip_projector.") :]
        elif key.startswith(("itm_head.", "logit_scale")):
            name = key
        else:
            name = None
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise UnsupportedCheckpointError(
            f"{source}: {len(unknown)} tensor(s) have no lit_internvl name{preview(unknown)}"
        )
    if unused:
        log.info("%s: %d InternVL-G tensor(s) InternVL-C does not use%s", source, len(unused), preview(unused))
    return out


def read_internvl1_state_dict(path: str | Path, kind: Kind = "g") -> dict[str, torch.Tensor]:
    """The folder's tensors under the lit_internvl names of InternVL-G or -C (what ``init_from: hf:`` loads)."""
    folder = checkpoint_folder(path)
    return internvl1_to_ours(read_tensors(folder), kind, str(folder))


def load_internvl1(path: str | Path, kind: Kind = "g", dtype: torch.dtype | None = None) -> nn.Module:
    """InternVL-G (``kind="g"``) or InternVL-C (``"c"``) with the folder's weights, in eval mode: every tensor of
    the model is loaded (an error lists what is missing or left over), then the position table is resized to
    ``force_image_size`` when the config sets one."""
    from lit_internvl.hf.load import load_state_exactly

    folder = checkpoint_folder(path)
    spec = read_internvl1_config(folder)
    with torch.device("meta"):
        model = build_internvl1(spec, kind)
    load_state_exactly(model, read_internvl1_state_dict(folder, kind), str(folder), dtype=dtype)
    model.vision.resize(spec.image_size)
    return model.eval()
