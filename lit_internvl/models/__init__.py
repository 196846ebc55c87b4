"""Compositions of components: the networks that stages train."""

from lit_internvl.models.builders import internvl
from lit_internvl.models.dual_encoder import DualEncoder
from lit_internvl.models.vlm import ImageTokenMismatchError, VisionLanguageModel

__all__ = ["DualEncoder", "ImageTokenMismatchError", "VisionLanguageModel", "internvl"]
