"""One part of a vision-language model from its own Hugging Face folder: a vision encoder released alone
(OpenGVLab's ``InternVisionModel``, e.g. InternViT-300M-448px-V2_5) or a text-only causal language model
(``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``Qwen3MoeForCausalLM``, e.g. Qwen2.5-0.5B; the
experts of a Qwen3-MoE stacked), read under lit_internvl's names. NMP starts from exactly these two:
``init_from: [hf:/InternViT-300M, hf:/Qwen2.5-0.5B]`` (the connector from scratch). The folder's remote code
(``auto_map``) is never run; only its tensors and ``config.json`` are read."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_internvl.hf.files import checkpoint_folder, read_json, read_tensors
from lit_internvl.hf.names import _our_name, gpt_oss_from_transformers, preview, stack_experts

VISION_ARCHITECTURES = ("InternVisionModel",)
TEXT_ARCHITECTURES = (
    "Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
)  # fmt: skip


def part_of(folder: str | Path) -> str | None:
    """``"vision"`` or ``"text"`` for a one-part folder, None for anything else (a whole VLM)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    architectures = read_json(config).get("architectures") or []
    if any(a in VISION_ARCHITECTURES for a in architectures):
        return "vision"
    if any(a in TEXT_ARCHITECTURES for a in architectures):
        return "text"
    return None


def read_part_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a one-part folder as ``vision.…`` or ``decoder.…`` (a tied head is not stored: the
    decoder's config must tie it too)."""
    folder = checkpoint_folder(folder)
    part = part_of(folder)
    if part is None:
        raise ValueError(f"{folder}: not a vision-encoder or text-only language-model folder")
    out, unknown = {}, []
    for key, tensor in read_tensors(folder).items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if part == "vision":
            name = _our_name("vision", key.removeprefix("vision_model."), internlm2=False)
        elif key.startswith("model."):
            name = "decoder." + key[len("model.") :]
        elif key.startswith("lm_head."):
            name = "decoder." + key
        else:
            name = None
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise ValueError(f"{folder}: {len(unknown)} tensor(s) have no lit_internvl name{preview(unknown)}")
    if "GptOssForCausalLM" in (read_json(folder / "config.json").get("architectures") or []):
        return gpt_oss_from_transformers(out, str(folder))  # its router renamed, experts transposed or dequantised
    return stack_experts(out, str(folder))
