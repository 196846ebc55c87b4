"""Records → samples → batches; the generated shapes world of the embedded default."""

from lit_internvl.data.datamodules import ShapesDataModule
from lit_internvl.data.templates import PlaceholderMismatchError, tokenize_conversation
from lit_internvl.data.tiling import tile_sample
from lit_internvl.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "PlaceholderMismatchError", "ShapesDataModule", "tile_sample",
    "tokenize_conversation",
]  # fmt: skip
