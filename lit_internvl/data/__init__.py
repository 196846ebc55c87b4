"""Records → samples → batches; the generated shapes world of the embedded default."""

from lit_internvl.data.collate import Collator
from lit_internvl.data.datamodule import RecordsDataModule
from lit_internvl.data.labelled import ImagesDataModule, ShapesImagesDataModule
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.shapes.datamodule import ShapesDataModule
from lit_internvl.data.templates import PlaceholderMismatchError, tokenize_conversation
from lit_internvl.data.tiling import tile_sample
from lit_internvl.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "Collator", "HFTokenizer", "ImagesDataModule", "PlaceholderMismatchError", "RecordsDataModule",
    "SampleBuilder", "SampleOptions", "ShapesDataModule", "ShapesImagesDataModule", "load_tokenizer", "tile_sample",
    "tokenize_conversation",
]  # fmt: skip
