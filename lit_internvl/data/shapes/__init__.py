"""The shapes world of the embedded default: its scenes, its datasets and its datamodule."""

from lit_internvl.data.shapes.datamodule import ShapesDataModule, ShapesTask
from lit_internvl.data.shapes.datasets import ShapesPairs, ShapesPreference, ShapesSplit, ShapesVQA
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
    "COLOURS", "QUESTION_TYPES", "REGIONS", "SHAPES", "SPLITS", "ShapeObject", "ShapesDataModule", "ShapesPairs",
    "ShapesPreference", "ShapesSplit", "ShapesTask", "ShapesVQA", "ShapesWorld", "class_names", "vocabulary",
    "write_records",
]  # fmt: skip
