"""The shapes world of the embedded default: its scenes (``world``), its datasets (``datasets``) and its
datamodule (``datamodule``; also ``lit_internvl.data.ShapesDataModule``).

The package itself exports the world only: the "shapes" tokenizer is built from the world's words, and the
datasets build samples with that tokenizer, so importing them here would make an import cycle.
"""

from lit_internvl.data.shapes.world import (
    COLOURS,
    QUESTION_TYPES,
    REGIONS,
    SHAPES,
    SPLITS,
    ShapeObject,
    ShapesWorld,
    class_names,
    vocabulary,
    write_records,
)

__all__ = [
    "COLOURS", "QUESTION_TYPES", "REGIONS", "SHAPES", "SPLITS", "ShapeObject", "ShapesWorld", "class_names",
    "vocabulary", "write_records",
]  # fmt: skip
