"""Records → samples → batches; the generated shapes world of the embedded default."""

from lit_internvl.data.datamodules import ShapesDataModule
from lit_internvl.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "ShapesDataModule"]
