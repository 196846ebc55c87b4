"""Weight names: lit_internvl ↔ transformers' InternVL (as saved) ↔ OpenGVLab's, and the tensor conversions
(fused and split q/k/v) that go with them.

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
    decoder.layers.N.mlp.experts.       ….layers.N.mlp.experts.E.{gate,up,down}_    (same as transformers, per
      {gate_up_proj,down_proj}            proj.weight (one matrix per expert)         expert, as Qwen3-MoE releases)
    decoder.layers.N.mlp.gate           ….layers.N.mlp.router (GPT-OSS)             (same as transformers)
    decoder.layers.N.mlp.experts.       ….layers.N.mlp.experts.{gate_up_proj        (GPT-OSS: as transformers, or MXFP4
      {gate_up_proj (E, 2I, H),           (E, H, 2I), down_proj (E, I, H)}            {…}_blocks / {…}_scales)
       down_proj (E, H, I)}               (GPT-OSS, transposed)

The experts of a Qwen3-MoE layer are one stacked tensor per projection in memory (lit_internvl and transformers 5
alike: :mod:`lit_internvl.components.moe`) and one matrix per expert on disk: transformers 5's ``save_pretrained``
writes ``experts.E.gate_proj.weight`` ``(I, H)``, ``experts.E.up_proj.weight`` and ``experts.E.down_proj.weight``
``(H, I)``, as the Qwen3-MoE releases and OpenGVLab's InternVL3_5-30B-A3B / -241B-A28B store them (xtuner's
Qwen3-MoE conversion lists the same names). Reading stacks them (:func:`stack_experts`; the in-memory stacked names
load as they are), writing splits them.

GPT-OSS's experts: transformers holds and saves them as ``GptOssExperts`` keeps them, stacked and transposed
(``gate_up_proj (E, H, 2I)`` with gate and up columns interleaved, ``down_proj (E, I, H)``, biases ``(E, 2I)`` and
``(E, H)``), the router as ``mlp.router`` with a bias; OpenGVLab's InternVLChatModel wraps transformers'
GptOssForCausalLM, so its names are the same. openai's releases store the expert matrices in MXFP4 instead
(``gate_up_proj_blocks (E, 2I, H/32, 16)`` uint8, two FP4 values a byte, and ``gate_up_proj_scales (E, 2I, H/32)``,
a power-of-two exponent per 32 values): read, they are dequantised (:func:`dequantize_mxfp4`, exact in bfloat16),
already in lit_internvl's orientation.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lit_internvl.components.language import LanguageConfig
from lit_internvl.hf.files import UnsupportedCheckpointError
from lit_internvl.hf.flash import FLASH_PARTS, flash_name, nest_mlp1

if TYPE_CHECKING:
    from lit_internvl.hf.config import CheckpointSpec

log = logging.getLogger(__name__)

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
    *FLASH_PARTS,  # InternVL3.5-Flash's mlp2 and router (lit_internvl.hf.flash)
)  # fmt: skip

# transformers' vision q/k/v, split where InternViT fuses them.
_VISION_QKV = re.compile(r"encoder\.layers?\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
# One expert's matrix on disk, under lit_internvl's decoder prefix; and the stacked tensors in memory.
_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_STACKED = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_INTERNLM2_WQKV = re.compile(r"layers\.(\d+)\.attention\.wqkv\.weight")


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


# The reading direction (checkpoint name → ours) of the tables above.
_VISION_LAYER_OURS, _VISION_EMBEDDINGS_OURS = _inverse(VISION_LAYER), _inverse(VISION_EMBEDDINGS)
_CONNECTOR_OURS = {**_inverse(CONNECTOR_TRANSFORMERS), **_inverse(CONNECTOR_OPENGVLAB)}
_INTERNLM2_LAYER_OURS, _INTERNLM2_TOP_OURS = _inverse(INTERNLM2_LAYER), _inverse(INTERNLM2_TOP)


# -- checkpoint → lit_internvl ---------------------------------------------------------------------------------


def to_ours(raw: Mapping[str, torch.Tensor], spec: CheckpointSpec, source: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (any layout) → lit_internvl names; fused and split projections converted."""
    out: dict[str, torch.Tensor] = {}
    to_fuse: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    internlm2 = spec.text_architecture == "internlm2"
    for key, tensor in raw.items():
        if key.endswith("rotary_emb.inv_freq"):  # recomputed, never loaded
            continue
        part, rest = _split_part(key)
        if part == "vision" and (qkv := _VISION_QKV.fullmatch(rest)):
            index, proj, leaf = qkv.groups()
            to_fuse[f"vision.layers.{index}.attn.qkv.{leaf}"][proj] = tensor
        elif part == "text" and internlm2 and (wqkv := _INTERNLM2_WQKV.fullmatch(rest)):
            for proj, value in zip("qkv", split_wqkv(tensor, spec.language)):
                out[f"decoder.layers.{wqkv.group(1)}.self_attn.{proj}_proj.weight"] = value
        elif (name := _our_name(part, rest, internlm2)) is not None:
            out[name] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise UnsupportedCheckpointError(
            f"{source}: {len(unknown)} tensor(s) have no lit_internvl name{preview(unknown)}"
        )
    out.update(_fused_qkv(to_fuse, source))
    if spec.flash is not None:
        out = nest_mlp1(out)
    if spec.text_architecture == "gpt_oss":
        out = gpt_oss_from_transformers(out, source)
    else:
        out = stack_experts(out, source)
    if spec.language.tie_embeddings and "decoder.lm_head.weight" in out:
        head = out.pop("decoder.lm_head.weight")
        if not torch.equal(head, out.get("decoder.embed_tokens.weight", head)):
            log.warning("%s: the config ties the LM head to the embeddings; the stored lm_head is ignored", source)
    return out


def _our_name(part: str | None, rest: str, internlm2: bool) -> str | None:
    """The lit_internvl name of a tensor of ``part`` called ``rest`` there (past the part's prefix); None if none."""
    if part == "vision":
        layer = re.fullmatch(r"encoder\.layers?\.(\d+)\.(.+)", rest)
        if layer:
            index, sub = layer.groups()
            return f"vision.layers.{index}.{_rename(sub, _VISION_LAYER_OURS) or sub}"
        if rest.startswith("embeddings."):
            sub = rest[len("embeddings.") :]
            return f"vision.embeddings.{_rename(sub, _VISION_EMBEDDINGS_OURS) or sub}"
        return None
    if part == "connector":
        sub = _rename(rest, _CONNECTOR_OURS)
        return sub and f"connector.{sub}"
    if part == "text":
        if internlm2:
            rest = _rename_layer(rest, _INTERNLM2_LAYER_OURS) or _rename(rest, _INTERNLM2_TOP_OURS) or rest
        return f"decoder.{rest}"
    if part == "lm_head":
        return f"decoder.lm_head.{rest}"
    return flash_name(part, rest)


def _fused_qkv(to_fuse: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """transformers' vision q/k/v projections → InternViT's fused ``attn.qkv``, rows ``[q; k; v]``."""
    out = {}
    for name, parts in to_fuse.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: {name} needs q, k and v projections, found only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def stack_experts(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Per-expert matrices (``….mlp.experts.E.{gate,up,down}_proj.weight``, lit_internvl's prefix) → the stacked
    ``….mlp.experts.gate_up_proj`` ``(E, 2I, H)`` (each expert's gate rows, then its up rows) and ``down_proj``
    ``(E, H, I)``; every other tensor as it is."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
    for name, tensor in state.items():
        match = _EXPERT.fullmatch(name)
        if match:
            experts[match.group(1)][match.group(3), int(match.group(2))] = tensor
        else:
            out[name] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(index for _, index in parts)
        missing = [
            f"{index}.{proj}_proj"
            for index in range(count)
            for proj in ("gate", "up", "down")
            if (proj, index) not in parts
        ]
        if missing:
            raise ValueError(f"{source}: {prefix} lacks the matrices of experts {preview(missing)}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate", e], parts["up", e]]) for e in range(count)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts["down", e] for e in range(count)])
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


_GPT_OSS_EXPERTS = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.(?:gate_up|down)_proj)(_blocks|_scales)?")
_GPT_OSS_ROUTER = re.compile(r"(decoder\.layers\.\d+\.mlp)\.(router|gate)\.(weight|bias)")
# FP4 (e2m1) by its 4-bit code: sign, 2 exponent bits, 1 mantissa bit (the OCP microscaling formats' table).
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def gpt_oss_from_transformers(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """GPT-OSS decoder tensors under lit_internvl's prefix but transformers' layout → lit_internvl's: ``mlp.router``
    → ``mlp.gate``, the experts transposed, MXFP4 experts dequantised; every other tensor as it is."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in state.items():
        experts, router = _GPT_OSS_EXPERTS.fullmatch(name), _GPT_OSS_ROUTER.fullmatch(name)
        if experts and experts.group(2):
            packed[experts.group(1)][experts.group(2)] = tensor
        elif experts:
            out[name] = tensor.transpose(1, 2).contiguous()  # (E, H, 2I) → (E, 2I, H); (E, I, H) → (E, H, I)
        elif router:
            out[f"{router.group(1)}.gate.{router.group(3)}"] = tensor
        else:
            out[name] = tensor
    for name, parts in packed.items():
        if set(parts) != {"_blocks", "_scales"}:
            raise UnsupportedCheckpointError(
                f"{source}: {name} has MXFP4 {sorted(parts)} but needs _blocks and _scales"
            )
        out[name] = dequantize_mxfp4(parts["_blocks"], parts["_scales"])
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 ``blocks (…, G, 16)`` uint8 (two FP4 values a byte, the low 4 bits first) and ``scales (…, G)`` uint8
    (a power of two per block of 32 values, exponent biased by 127) → ``(…, G·32)`` (transformers'
    ``integrations/mxfp4.py``, ``convert_moe_packed_tensors``, before its transpose). Exact in bfloat16: each value is
    an FP4 number times a power of two."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    table = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8).long()
    values = torch.stack([table[blocks & 0x0F], table[blocks >> 4]], dim=-1).flatten(-2)  # (…, G, 32)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


def gpt_oss_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gpt_oss_from_transformers` (without the quantisation): ``mlp.gate`` → ``mlp.router``,
    the experts transposed back."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        experts, router = _GPT_OSS_EXPERTS.fullmatch(name), _GPT_OSS_ROUTER.fullmatch(name)
        if experts and not experts.group(2):
            out[name] = tensor.transpose(1, 2)
        elif router:
            out[f"{router.group(1)}.router.{router.group(3)}"] = tensor
        else:
            out[name] = tensor
    return out


# -- lit_internvl → transformers -------------------------------------------------------------------------------


def to_transformers_state_dict(
    state: Mapping[str, torch.Tensor], text_type: str | None = None
) -> dict[str, torch.Tensor]:
    """lit_internvl names → the names transformers' ``save_pretrained`` writes for InternVL; ``text_type``
    ``"gpt_oss"``: a GPT-OSS decoder, its router and experts in transformers' layout."""
    if text_type == "gpt_oss":
        state = gpt_oss_to_transformers(state)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        layer = re.fullmatch(r"vision\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if layer:  # InternViT's fused qkv → transformers' three projections
            index, leaf = layer.groups()
            for proj, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"vision_tower.encoder.layer.{index}.attention.{proj}_proj.{leaf}"] = part.clone()
            continue
        stacked = _STACKED.fullmatch(name) if text_type != "gpt_oss" else None  # GPT-OSS's stay stacked
        if stacked:  # the experts as transformers' save_pretrained writes them: a matrix per expert
            prefix = "language_model.model." + stacked.group(1)[len("decoder.") :]
            out.update(_split_experts(prefix, stacked.group(2), tensor))
            continue
        new = _transformers_name(name)
        if new is None:
            raise ValueError(f"{name} has no name in transformers' InternVL layout")
        out[new] = tensor.contiguous()
    return out


def _split_experts(prefix: str, projection: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stacked ``gate_up_proj`` ``(E, 2I, H)`` or ``down_proj`` ``(E, H, I)`` → ``{prefix}.E.{gate,up,down}_proj.weight``."""
    out = {}
    for index, matrix in enumerate(tensor):
        if projection == "gate_up_proj":
            gate, up = matrix.chunk(2, dim=0)
            out[f"{prefix}.{index}.gate_proj.weight"] = gate.clone()  # clones: safetensors refuses shared storage
            out[f"{prefix}.{index}.up_proj.weight"] = up.clone()
        else:
            out[f"{prefix}.{index}.down_proj.weight"] = matrix.clone()
    return out


def _transformers_name(name: str) -> str | None:
    layer = re.fullmatch(r"vision\.layers\.(\d+)\.(.+)", name)
    if layer:
        new = _rename(layer.group(2), VISION_LAYER)
        return new and f"vision_tower.encoder.layer.{layer.group(1)}.{new}"
    for ours, theirs, table in (
        ("vision.embeddings.", "vision_tower.embeddings.", VISION_EMBEDDINGS),
        ("connector.", "multi_modal_projector.", CONNECTOR_TRANSFORMERS),
    ):
        if name.startswith(ours):
            new = _rename(name[len(ours) :], table)
            return new and theirs + new
    if name.startswith("decoder.lm_head."):
        return "language_model.lm_head." + name[len("decoder.lm_head.") :]
    if name.startswith("decoder."):
        return "language_model.model." + name[len("decoder.") :]
    return None


# -- helpers ---------------------------------------------------------------------------------------------------


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


def preview(keys: list[str], limit: int = 5) -> str:
    """`` [a, b, …]``: the first names of a list, for an error message."""
    if not keys:
        return ""
    return f" [{', '.join(keys[:limit])}{', …' if len(keys) > limit else ''}]"
