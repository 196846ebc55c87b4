"""Plain ``nn.Module`` parts with typed contracts; nothing here knows about stages or Lightning."""

from lit_internvl.components.attention import attention
from lit_internvl.components.connectors import (
    FlashConnector,
    FlashMLP,
    LinearProjector,
    MultiBudgetConnector,
    PixelShuffleMLP,
    pixel_shuffle,
)
from lit_internvl.components.language import Decoder, LanguageConfig, TextEncoder
from lit_internvl.components.router import VisualResolutionRouter
from lit_internvl.components.vision import InternViT, InternViTConfig

__all__ = [
    "Decoder", "FlashConnector", "FlashMLP", "InternViT", "InternViTConfig", "LanguageConfig", "LinearProjector",
    "MultiBudgetConnector", "PixelShuffleMLP", "TextEncoder", "VisualResolutionRouter", "attention", "pixel_shuffle",
]  # fmt: skip
