"""Datasets of one split of the shapes world: image–caption pairs, questions, preference pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch.utils.data import Dataset

from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.images import to_tensor
from lit_internvl.data.records import IMAGE_PLACEHOLDER, Record
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.shapes.world import ShapesWorld


class ShapesSplit(Dataset, ABC):
    """``size`` samples generated from one split of the world; :meth:`sample` builds sample ``index``.
    Indices past the end raise IndexError, so that ``for sample in dataset`` ends."""

    def __init__(self, world: ShapesWorld, size: int) -> None:
        self.world, self.size = world, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside this {self.world.split} split of {self.size} samples")
        return self.sample(index)

    @abstractmethod
    def sample(self, index: int) -> dict:
        """Sample ``index`` of the split (``0 <= index < size``)."""


class ShapesPairs(ShapesSplit):
    """Image–caption pairs of one split: ``{pixel_values (3, H, W), input_ids, label, caption_key}``."""

    def __init__(self, world: ShapesWorld, size: int, tokenizer: Tokenizer) -> None:
        super().__init__(world, size)
        self.tokenizer = tokenizer

    def sample(self, index: int) -> dict:
        pair = self.world.pair(index)
        return {
            "pixel_values": to_tensor(pair["image"]),
            "input_ids": torch.tensor(self.tokenizer.encode(pair["text"])),
            "label": pair["label"],
            "caption_key": pair["caption_key"],
        }


class ShapesVQA(ShapesSplit):
    """Questions about generated scenes, as conversation records built into samples by a
    :class:`SampleBuilder` (the same path real data takes). ``meta`` holds the question type and answer."""

    def __init__(
        self, world: ShapesWorld, size: int, builder: SampleBuilder, max_objects: int, describe_ratio: float = 0.0
    ) -> None:
        super().__init__(world, size)
        self.builder, self.max_objects, self.describe_ratio = builder, max_objects, describe_ratio

    def sample(self, index: int) -> dict:
        qa = self.world.vqa(index, self.max_objects, self.describe_ratio)
        question = f"{IMAGE_PLACEHOLDER}\n{qa['question']}"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": qa["answer"]}]
        fields = {"conversations": turns, "meta": {"type": qa["type"], "answer": qa["answer"]}}
        name = f"shapes-{self.world.split}:{index}"
        return self.builder.safe(Record("conversation", name, fields, [qa["image"]]))


class ShapesPreference(ShapesSplit):
    """Preference pairs about generated scenes: the right one-word answer (chosen) and a wrong one
    of the same question type (rejected), as preference records built by a :class:`SampleBuilder`."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder) -> None:
        super().__init__(world, size)
        self.builder = builder

    def sample(self, index: int) -> dict:
        pair = self.world.preference(index)
        fields = {"question": f"{IMAGE_PLACEHOLDER}\n{pair['question']}", "chosen": pair["chosen"],
                  "rejected": pair["rejected"], "meta": {"type": pair["type"], "answer": pair["chosen"]}}  # fmt: skip
        return self.builder.safe(Record("preference", f"shapes-{self.world.split}:{index}", fields, [pair["image"]]))
