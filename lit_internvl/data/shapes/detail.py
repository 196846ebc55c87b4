"""The shapes world's fine-detail variant: scenes of which some need every visual token and others do not, so that a
router that compresses tiles (InternVL3.5-Flash's ViR, :mod:`lit_internvl.stages.vico`) has a trade-off to learn.

At 112 px the tiny tower sees 8×8 patches: 16 tokens a tile through ``mlp1`` (a token per 28 px cell of a 4×4 grid), 4
through ``mlp2`` (a token per 56 px quadrant). Each scene is one tile and one of two kinds, drawn per scene:

- ``coarse`` (probability ``1 − fine_ratio``): one or two large objects (radius 16–21 px), each in its own quadrant:
  what a question asks (its colour, its shape, how many, which quadrant) is there at quadrant scale, 4 tokens.
- ``fine``: three to five small objects (radius 6–8 px, about a patch), each in its own cell of the 4×4 grid; the
  questions ask the colour of one by its shape, the shape of one by its colour, or how many there are: up to four
  small things share a quadrant, and a 4-token tile must hold all of them in one token.

No two objects of a scene alike in colour or in shape (so every question has one answer), every word one the
``"shapes"`` tokenizer already has (quadrants are the regions ``top left`` … ``bottom right``; counts are digits).
A question's ``meta`` holds its ``type``, ``answer`` and the scene's ``detail`` kind.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from torch.utils.data import Dataset

from lit_internvl.data.records import IMAGE_PLACEHOLDER, Record
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.shapes.datamodule import ShapesDataModule
from lit_internvl.data.shapes.datasets import ShapesSplit
from lit_internvl.data.shapes.world import COLOURS, SHAPES, ShapeObject, ShapesWorld, Split

Detail = Literal["coarse", "fine"]
DETAILS: tuple[Detail, ...] = get_args(Detail)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DetailQuestion = Literal["colour", "shape", "count", "position"]
#: The counts each kind of scene holds.
COUNTS: dict[str, tuple[int, int]] = {"coarse": (1, 2), "fine": (3, 5)}


class DetailWorld(ShapesWorld):
    """Scenes of :data:`DETAILS` kinds (module docstring); ``fine_ratio`` of them fine. Deterministic in
    ``(seed, split, index)`` as every shapes world."""

    def __init__(self, image_size: int = 112, seed: int = 0, split: Split = "train", fine_ratio: float = 1 / 3) -> None:
        super().__init__(image_size, seed, split)
        if not 0.0 <= fine_ratio <= 1.0:
            raise ValueError(f"fine_ratio must lie in [0, 1], got {fine_ratio}")
        self.fine_ratio = fine_ratio

    def detail_scene(self, index: int) -> tuple[list[ShapeObject], Detail, object]:
        """The objects of scene ``index``, its kind and the generator that draws the rest (question, pixels)."""
        rng = self.rng(index, "detail")
        kind: Detail = "fine" if rng.random() < self.fine_ratio else "coarse"
        fewest, most = COUNTS[kind]
        count = int(rng.integers(fewest, most + 1))
        grid = 2 if kind == "coarse" else 4  # quadrants, or the 4×4 cells of the 16-token grid
        cell = self.image_size / grid
        scale = (0.28, 0.38) if kind == "coarse" else (0.22, 0.3)
        colours, shapes = rng.permutation(list(COLOURS))[:count], rng.permutation(SHAPES)[:count]
        objects = []
        for colour, shape, where in zip(colours, shapes, rng.permutation(grid * grid)[:count]):
            row, col = divmod(int(where), grid)
            obj = ShapeObject(str(colour), str(shape), (0.0, 0.0), float(rng.uniform(*scale) * cell))
            slack = max(cell / 2 - obj.extent - 1, 0.0)  # every drawn pixel inside the object's cell
            x, y = (col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(replace(obj, centre=(float(x), float(y))))
        return objects, kind, rng

    def quadrant(self, obj: ShapeObject) -> str:
        col, row = (min(int(2 * c / self.image_size), 1) for c in obj.centre)
        return QUADRANTS[2 * row + col]

    def vqa(self, index: int, max_objects: int = 5, describe_ratio: float = 0.0) -> dict:
        """A scene, a question and its one-word (or two-word) answer: ``{image, question, answer, type, detail}``.
        Coarse scenes are asked colour, shape, count or position (quadrant); fine ones colour, shape or count. With
        probability ``describe_ratio`` the question is instead "Describe the objects by shape." (or "by colour."),
        answered with every object in that order (type ``description``; :meth:`description`)."""
        objects, kind, rng = self.detail_scene(index)
        describe = self.rng(index, "describe")
        if describe_ratio and describe.random() < describe_ratio:
            order = ("shape", "colour")[int(describe.integers(2))]
            question, answer = f"Describe the objects by {order}.", self.detail_description(objects, kind, order)
            return {"image": self.render(objects, rng), "question": question, "answer": answer,
                    "type": "description", "detail": kind}  # fmt: skip
        target = objects[int(rng.integers(len(objects)))]
        kinds = get_args(DetailQuestion) if kind == "coarse" else ("colour", "shape", "count")
        question_type = kinds[int(rng.integers(len(kinds)))]
        if question_type == "colour":
            question, answer = f"What colour is the {target.shape}?", target.colour
        elif question_type == "shape":
            question, answer = f"What shape is the {target.colour} object?", target.shape
        elif question_type == "count":
            question, answer = "How many objects are there?", str(len(objects))
        else:
            question, answer = f"Where is the {target.name}?", self.quadrant(target)
        image = self.render(objects, rng)
        return {"image": image, "question": question, "answer": answer, "type": question_type, "detail": kind}

    def detail_description(self, objects: list[ShapeObject], kind: Detail, order: str) -> str:
        """Every object listed by shape or by colour (as :meth:`ShapesWorld.description`, so that a model learns to find
        an object by either), a coarse scene's with its quadrant: ``"a red circle at the top left, a blue square"``."""
        names = SHAPES if order == "shape" else list(COLOURS)
        ordered = sorted(objects, key=lambda obj: names.index(getattr(obj, order)))
        where = (lambda obj: f" at the {self.quadrant(obj)}") if kind == "coarse" else (lambda obj: "")
        return ", ".join(f"a {obj.name}{where(obj)}" for obj in ordered)

    def answer_options(self, kind: str, max_objects: int = 5) -> list[str]:
        """Every answer a question type can have (its chance level is one over their number)."""
        counts = [str(n) for n in range(COUNTS["coarse"][0], COUNTS["fine"][1] + 1)]
        return {"colour": list(COLOURS), "shape": list(SHAPES), "count": counts, "position": list(QUADRANTS)}[kind]


class ShapesDetailVQA(ShapesSplit):
    """The detail world's questions as conversation records built by a :class:`SampleBuilder` (``meta``: type,
    answer, detail kind)."""

    def __init__(self, world: DetailWorld, size: int, builder: SampleBuilder, describe_ratio: float = 0.0) -> None:
        super().__init__(world, size)
        self.builder, self.describe_ratio = builder, describe_ratio

    def sample(self, index: int) -> dict:
        qa = self.world.vqa(index, describe_ratio=self.describe_ratio)
        turns = [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{qa['question']}"},
            {"from": "gpt", "value": qa["answer"]},
        ]
        meta = {"type": qa["type"], "answer": qa["answer"], "detail": qa["detail"]}
        name = f"shapes-detail-{self.world.split}:{index}"
        return self.builder.safe(Record("conversation", name, {"conversations": turns, "meta": meta}, [qa["image"]]))


class ShapesDetailDataModule(ShapesDataModule):
    """The fine-detail questions (module docstring) as the embedded default's data for InternVL3.5-Flash's stages: the
    ``conversation`` view (SFT, ViCO) and the ``prompt`` view (predict), one 112 px tile a scene, the ``"shapes"``
    tokenizer. :attr:`question_types` gives each type's chance level.

    Args:
        fine_ratio: the share of scenes that need fine detail.
        describe_ratio: the share of *training* questions that ask for every object instead (as
            :class:`~lit_internvl.data.ShapesDataModule`'s: one answer supervises every object); held-out splits ask
            the one-word questions only.
        The others: :class:`~lit_internvl.data.ShapesDataModule`'s.
    """

    def __init__(
        self,
        fine_ratio: float = 1 / 3,
        describe_ratio: float = 0.0,
        tile_size: int = 112,
        train_size: int = 10_000,
        val_size: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        system: str | None = "",
        tokenizer: str = "shapes",
    ) -> None:
        super().__init__(
            records="questions", tile_size=tile_size, train_size=train_size, val_size=val_size, batch_size=batch_size,
            num_workers=num_workers, seed=seed, system=system, tokenizer=tokenizer,
        )  # fmt: skip
        DetailWorld(fine_ratio=fine_ratio)  # checks the ratio
        if not 0.0 <= describe_ratio <= 1.0:
            raise ValueError(f"describe_ratio must lie in [0, 1], got {describe_ratio}")
        self.fine_ratio, self.describe_ratio = fine_ratio, describe_ratio
        world = DetailWorld(tile_size)
        self._question_types = {kind: 1 / len(world.answer_options(kind)) for kind in get_args(DetailQuestion)}

    @property
    def source(self) -> str:
        return f"data {type(self).__name__} (fine-detail questions)"

    def offered_views(self) -> frozenset[str]:
        return frozenset({"conversation", "prompt"})

    def _dataset(self, split: Split, size: int, views) -> Dataset:
        world = DetailWorld(self.hparams.tile_size, self.hparams.seed, split, self.fine_ratio)
        describe = self.describe_ratio if split == "train" else 0.0
        return ShapesDetailVQA(world, size, self.sample_builder(split == "train", views), describe)
