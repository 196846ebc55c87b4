"""Datasets of one split of the shapes world: image–caption pairs, questions, preference pairs, interleaved
documents and text-only sentences."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch.utils.data import Dataset

from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.images import to_tensor
from lit_internvl.data.pairs import CaptionForms, draw_negative, pair_sample
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
    """Image–caption pairs of one split, as :mod:`lit_internvl.data.pairs` samples: the caption's ITC, ITM
    and ITG forms and, with ``negative`` (the stage reads ITM's negative), the caption of another sample drawn
    uniformly from the split (seeded by ``(seed, index)``) whose ``caption_key`` differs (a caption with the same
    key is true of this image too): each draw renders another scene, so it is made only when asked for.
    ``image_id`` is the sample index: every scene is its own image."""

    def __init__(
        self, world: ShapesWorld, size: int, tokenizer: Tokenizer, forms: CaptionForms, negative: bool = False
    ) -> None:
        super().__init__(world, size)
        self.tokenizer, self.forms, self.with_negative = tokenizer, forms, negative

    def negative(self, index: int, caption_key: int) -> str:
        def fits(j: int) -> str | None:
            other = self.world.pair(j)
            return other["text"] if other["caption_key"] != caption_key else None

        caption = draw_negative(index, self.size, self.world.seed, fits)
        if caption is None:
            raise ValueError(f"no caption of another class or region among {self.size} shapes samples")
        return caption

    def sample(self, index: int) -> dict:
        pair = self.world.pair(index)
        key = pair["caption_key"]
        negative = self.negative(index, key) if self.with_negative else None
        return pair_sample(
            to_tensor(pair["image"]), pair["text"], negative, self.tokenizer, self.forms,
            pair["label"], key, index, f"shapes-{self.world.split}:{index}",
        )  # fmt: skip


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


class ShapesInterleaved(ShapesSplit):
    """Interleaved documents (:meth:`ShapesWorld.interleaved`) of ``images`` pictures each, a number drawn per
    document from ``images = (fewest, most)`` (seeded by its index), built into samples by a :class:`SampleBuilder`."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder, images: tuple[int, int]) -> None:
        super().__init__(world, size)
        fewest, most = images
        if not 1 <= fewest <= most:
            raise ValueError(f"images per document must be (fewest, most) with 1 <= fewest <= most, got {images}")
        self.builder, self.images = builder, (fewest, most)

    def sample(self, index: int) -> dict:
        count = int(self.world.rng(index, "images").integers(self.images[0], self.images[1] + 1))
        doc = self.world.interleaved(index, count)
        record = Record("interleaved", f"shapes-{self.world.split}:doc{index}", {"texts": doc["texts"]}, doc["images"])
        return self.builder.safe(record)


class ShapesText(ShapesSplit):
    """The world's text-only corpus (:meth:`ShapesWorld.sentence`), built into samples by a :class:`SampleBuilder`."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder) -> None:
        super().__init__(world, size)
        self.builder = builder

    def sample(self, index: int) -> dict:
        record = Record("text", f"shapes-{self.world.split}:text{index}", {"text": self.world.sentence(index)}, [])
        return self.builder.safe(record)
