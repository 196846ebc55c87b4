"""Builders: one function that assembles a named InternVL size from component presets.

``internvl("InternVL3-1B")`` = InternViT-300M + pixel-shuffle MLP + Qwen2.5-0.5B decoder, with
InternVL's ``<IMG_CONTEXT>`` id. Build under ``torch.device("meta")`` to count or shard a real size
without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_internvl.components.connectors import FlashConnector, PixelShuffleMLP
from lit_internvl.components.language import Decoder, LanguageConfig
from lit_internvl.components.vision import InternViT, InternViTConfig
from lit_internvl.models.vlm import VisionLanguageModel

# <IMG_CONTEXT> in the Qwen2.5-based tokenizers of InternVL 2.5/3 (151667, published), in InternVL2.5-8B's
# InternLM2.5 tokenizer (92546: the third token InternVL adds after its 92544 base tokens, as for Qwen2.5;
# not checked against the release: lit_internvl.hf reads the id from a checkpoint's tokenizer files), and
# in the byte tokenizer of the embedded default (256 bytes, then <IMG_CONTEXT> as the 6th special token;
# lit_internvl.data.tokenizer, not imported here so that models stay free of the data pipeline).
QWEN2_IMG_CONTEXT_ID = 151667
# <IMG_CONTEXT> of InternVL3.5's Qwen3 tokenizer: InternVL's tokens follow Qwen3's 151669 (up to </think>, 151668),
# <img> 151669, </img> 151670, <IMG_CONTEXT> 151671 (xtuner's InternVL3.5 configs and MindSpeed-MM's
# InternVL3_5-30B-A3B recipe give image_token_id 151671).
QWEN3_IMG_CONTEXT_ID = 151671
INTERNLM2_IMG_CONTEXT_ID = 92546
# <IMG_CONTEXT> of InternVL3.5-20B-A4B's GPT-OSS tokenizer (o200k_harmony, 200019 tokens up to <|endofprompt|> 200018):
# InternVL's added tokens follow, <img> 200019, </img> 200020, <IMG_CONTEXT> 200021. Derived, not checked against the
# release (lit_internvl.hf reads the id from a checkpoint's tokenizer files).
GPT_OSS_IMG_CONTEXT_ID = 200021
BYTE_IMG_CONTEXT_ID = 261


@dataclass(frozen=True)
class InternVLPreset:
    vision: str  # a key of VISION_PRESETS
    language: str  # a key of LANGUAGE_PRESETS
    image_context_id: int
    downsample_ratio: float = 0.5
    flash: bool = False  # InternVL3.5-Flash: FlashConnector (mlp1, mlp2, the router) instead of PixelShuffleMLP


INTERNVL_PRESETS: dict[str, InternVLPreset] = {
    "InternVL3-1B": InternVLPreset("InternViT-300M-448px", "InternVL3-1B", QWEN2_IMG_CONTEXT_ID),
    "InternVL3-2B": InternVLPreset("InternViT-300M-448px", "InternVL3-2B", QWEN2_IMG_CONTEXT_ID),
    "InternVL3-8B": InternVLPreset("InternViT-300M-448px", "InternVL3-8B", QWEN2_IMG_CONTEXT_ID),
    "InternVL2.5-8B": InternVLPreset("InternViT-300M-448px", "InternVL2.5-8B", INTERNLM2_IMG_CONTEXT_ID),
    # InternVL3.5: InternViT-300M with the Qwen3 sizes, InternViT-6B (45 layers, as InternViT-6B-448px-V2_5) with
    # Qwen3-32B and Qwen3-235B-A22B.
    **{
        f"InternVL3.5-{size}": InternVLPreset("InternViT-300M-448px", f"InternVL3.5-{size}", QWEN3_IMG_CONTEXT_ID)
        for size in ("1B", "2B", "4B", "8B", "14B", "30B-A3B")
    },
    "InternVL3.5-38B": InternVLPreset("InternViT-6B-448px-V1-5", "InternVL3.5-38B", QWEN3_IMG_CONTEXT_ID),
    "InternVL3.5-241B-A28B": InternVLPreset("InternViT-6B-448px-V1-5", "InternVL3.5-241B-A28B", QWEN3_IMG_CONTEXT_ID),
    # InternVL3.5-20B-A4B (OpenGVLab's InternVL3_5-GPT-OSS-20B-A4B-Preview): InternViT-300M + GPT-OSS-20B.
    "InternVL3.5-20B-A4B": InternVLPreset("InternViT-300M-448px", "InternVL3.5-20B-A4B", GPT_OSS_IMG_CONTEXT_ID),
    # InternVL3.5-Flash (OpenGVLab's InternVL3_5-*-Flash): the same towers, the connector with mlp2 and the router.
    **{
        f"InternVL3.5-{size}-Flash": InternVLPreset(vision, f"InternVL3.5-{size}", QWEN3_IMG_CONTEXT_ID, flash=True)
        for size, vision in (
            ("1B", "InternViT-300M-448px"),
            ("2B", "InternViT-300M-448px"),
            ("4B", "InternViT-300M-448px"),
            ("8B", "InternViT-300M-448px"),
            ("30B-A3B", "InternViT-300M-448px"),
            ("38B", "InternViT-6B-448px-V1-5"),
        )
    },
    # The embedded default: tiny encoder and decoder, the byte tokenizer's <IMG_CONTEXT>.
    "tiny": InternVLPreset("tiny", "tiny", BYTE_IMG_CONTEXT_ID),
    # recipes/sft.yaml's and mpo.yaml's model: the "shapes" tokenizer (the byte tokenizer's ids, then words).
    "tiny-shapes": InternVLPreset("tiny", "tiny-shapes", BYTE_IMG_CONTEXT_ID),
    # Their Qwen3 and Qwen3-MoE twins (recipes/models/tiny_qwen3.yaml, tiny_moe.yaml).
    "tiny-qwen3": InternVLPreset("tiny", "tiny-qwen3", BYTE_IMG_CONTEXT_ID),
    "tiny-moe": InternVLPreset("tiny", "tiny-moe", BYTE_IMG_CONTEXT_ID),
    # The GPT-OSS twin.
    "tiny-gpt-oss": InternVLPreset("tiny", "tiny-gpt-oss", BYTE_IMG_CONTEXT_ID),
}


def vlm_from_configs(
    vision: InternViTConfig,
    language: LanguageConfig,
    image_context_id: int,
    downsample_ratio: float = 0.5,
    connector_norm_eps: float = 1e-5,
    flash: dict | None = None,
) -> VisionLanguageModel:
    """InternViT → PixelShuffleMLP → Decoder from explicit configs (what :mod:`lit_internvl.hf` reads); with
    ``flash`` (:class:`~lit_internvl.components.FlashConnector`'s options), InternVL3.5-Flash's connector instead."""
    encoder, decoder = InternViT(vision), Decoder(language)
    if flash is not None:
        connector = FlashConnector(
            encoder.hidden_size, decoder.hidden_size, downsample_ratio, norm_eps=connector_norm_eps, **flash
        )
    else:
        connector = PixelShuffleMLP(encoder.hidden_size, decoder.hidden_size, downsample_ratio, connector_norm_eps)
    return VisionLanguageModel(encoder, connector, decoder, image_context_id)


def internvl(name: str) -> VisionLanguageModel:
    """The InternVL model of a published size (``"InternVL3-1B"``, ``"InternVL3.5-30B-A3B"``, …) or ``"tiny"``."""
    if name not in INTERNVL_PRESETS:
        raise ValueError(f"Unknown InternVL preset {name!r}; known: {sorted(INTERNVL_PRESETS)}")
    preset = INTERNVL_PRESETS[name]
    return vlm_from_configs(
        InternViTConfig.from_name(preset.vision),
        LanguageConfig.from_name(preset.language),
        preset.image_context_id,
        preset.downsample_ratio,
        flash={} if preset.flash else None,
    )
