"""The "shapes" world: the generated, seeded scenes, questions and captions behind every embedded-default recipe.

Each scene is a small image with coloured geometric objects on a dark, noisy background. Everything
about a scene is a pure function of ``(seed, split, index)``, so any sample can be regenerated
anywhere (a data-loader worker, another rank) and train/validation splits never share a scene.
Stage 1 uses :meth:`ShapesWorld.pair` (one object and a caption); the other stages draw questions
and answers (:meth:`~ShapesWorld.vqa`), interleaved documents (:meth:`~ShapesWorld.interleaved`),
text-only sentences (:meth:`~ShapesWorld.sentence`) and preference pairs
(:meth:`~ShapesWorld.preference`) from the same kind of scenes. :func:`write_records` writes any of
them as a jsonl file of records with PNG images, the format real data comes in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

from lit_internvl.data.records import IMAGE_PLACEHOLDER, RecordKind

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Where an object's centre lies, in thirds of the image (row-major).
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
QuestionType = Literal["colour", "shape", "count", "position"]
QUESTION_TYPES: tuple[QuestionType, ...] = get_args(QuestionType)
# What a description lists its objects by (see ShapesWorld.description).
DescriptionOrder = Literal["shape", "colour"]
# What a segmentation mask's classes are (see ShapesWorld.mask).
MaskClasses = Literal["shape", "colour", "object"]
CORNERS = {"circle": "no", "square": "four", "triangle": "three", "diamond": "four", "cross": "twelve"}


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float

    @property
    def class_id(self) -> int:
        return list(COLOURS).index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def extent(self) -> float:
        """Distance from the centre to the farthest drawn pixel (a square's corners lie beyond ``radius``)."""
        return self.radius * (0.8 * 2**0.5 if self.shape == "square" else 1.0)

    def region(self, image_size: int) -> str:
        col, row = (min(int(3 * c / image_size), 2) for c in self.centre)
        return REGIONS[3 * row + col]


def vocabulary() -> list[str]:
    """Every word the shapes world writes (questions, answers, descriptions, captions, documents,
    sentences) and the chat template's roles: the whole-word tokens of the ``"shapes"`` tokenizer."""
    words = {*COLOURS, *SHAPES, *(w for region in REGIONS for w in region.split()), *CORNERS.values()}
    words |= set(
        "What colour is the shape object How many objects are there Where Describe by image a at 1 2 3 Answer in "
        "one word photo of Next That makes pictures A has corners The kinds Every can be or".split()
    )
    words |= {str(len(COLOURS) * len(SHAPES))}  # "one of 30 kinds of object" (sentence)
    words |= {"system", "user", "assistant"}  # the roles of the chat templates
    return sorted(words)


def class_names() -> list[str]:
    """``"red circle"``, ``"red square"``, ...: class id ``c·len(SHAPES) + s``."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        a = 0.35 * r
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    raise ValueError(f"Unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill) -> None:
    """Draw ``obj`` in ``fill`` (the image's colour, or a mask's class)."""
    (cx, cy), r = obj.centre, obj.radius
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        a = 0.8 * r
        draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)


class ShapesWorld:
    """Deterministic scenes: ``world.scene(i)`` is the same on every call, process and machine."""

    def __init__(self, image_size: int = 56, seed: int = 0, split: Split = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}")
        self.image_size = image_size
        self.seed = seed
        self.split = split

    def rng(self, index: int, purpose: str = "scene") -> np.random.Generator:
        key = f"{self.seed}/{self.split}/{purpose}/{index}".encode()
        return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def random_object(self, rng: np.random.Generator) -> ShapeObject:
        size = self.image_size
        radius = float(rng.uniform(0.13, 0.24) * size)
        cx, cy = rng.uniform(radius, size - radius, size=2)
        return ShapeObject(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            centre=(float(cx), float(cy)),
            radius=radius,
        )

    def render(self, objects: list[ShapeObject], rng: np.random.Generator) -> Image.Image:
        size = self.image_size
        background = rng.uniform(0, 60) + rng.normal(0, 8, size=(size, size, 1)) + rng.uniform(-10, 10, size=3)
        image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for obj in objects:
            shade = rng.uniform(0.8, 1.0)
            _draw(draw, obj, tuple(int(c * shade) for c in COLOURS[obj.colour]))
        return image

    def mask(self, objects: list[ShapeObject], classes: MaskClasses = "shape") -> Image.Image:
        """The pixel mask of :meth:`render`'s image of ``objects`` (an ``"L"`` image, every pixel of an object its
        class, drawn with the same geometry, so exactly the pixels that object covers): 0 the background, else 1 +
        the object's index in :data:`SHAPES` (``"shape"``), in :data:`COLOURS` (``"colour"``) or its class id
        (``"object"``, colour × shape)."""
        mask = Image.new("L", (self.image_size, self.image_size), 0)
        draw = ImageDraw.Draw(mask)
        for obj in objects:
            value = {"shape": SHAPES.index(obj.shape), "colour": list(COLOURS).index(obj.colour)}.get(classes)
            _draw(draw, obj, 1 + (obj.class_id if value is None else value))
        return mask

    def pair(self, index: int) -> dict:
        """One object and its caption: ``{image, text, label, caption_key}``.

        Training captions vary their wording and mention the object's region half of the time;
        validation and test captions always read ``"a {colour} {shape} at the {region}"``.
        ``caption_key`` identifies what a caption asserts (class and region), so that retrieval
        counts any caption that truly describes an image as a hit.
        """
        rng = self.rng(index)
        obj = self.random_object(rng)
        image = self.render([obj], rng)
        region = obj.region(self.image_size)
        if self.split == "train":
            phrase = str(rng.choice(("a {}", "a photo of a {}", "the {}", "{}"))).format(obj.name)
            text = f"{phrase} at the {region}" if rng.random() < 0.5 else phrase
        else:
            text = f"a {obj.name} at the {region}"
        return {
            "image": image,
            "text": text,
            "label": obj.class_id,
            "caption_key": obj.class_id * len(REGIONS) + REGIONS.index(region),
        }

    def scene(self, index: int, max_objects: int = 3) -> tuple[list[ShapeObject], np.random.Generator]:
        """1..max_objects objects, no two alike in colour or in shape (so every question has one
        answer), each drawn whole inside its own region: the image's 3×3 grid of cells, one object a cell
        at most, so no object hides or touches another and no centre lies on a border between regions."""
        rng = self.rng(index, "scene")
        count = int(rng.integers(1, max_objects + 1))
        colours = rng.permutation(list(COLOURS))[:count]
        shapes = rng.permutation(SHAPES)[:count]
        cell = self.image_size / 3
        objects: list[ShapeObject] = []
        for colour, shape, where in zip(colours, shapes, rng.permutation(len(REGIONS))[:count]):
            row, col = divmod(int(where), 3)
            obj = ShapeObject(str(colour), str(shape), (0.0, 0.0), float(rng.uniform(0.28, 0.38) * cell))
            # Room to move while every drawn pixel stays a pixel inside the cell (rasterising may reach one further).
            slack = cell / 2 - obj.extent - 1
            x, y = (col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(replace(obj, centre=(float(x), float(y))))
        return objects, rng

    def vqa(self, index: int, max_objects: int = 3, describe_ratio: float = 0.0) -> dict:
        """A scene, a question of one of :data:`QUESTION_TYPES`, and its one-word (or two-word) answer.

        With probability ``describe_ratio`` the question is instead ``"Describe the objects by shape."``
        or ``"... by colour."`` (type ``"description"``, either order half the time), answered by
        :meth:`description`.
        """
        objects, rng = self.scene(index, max_objects)
        describe = self.rng(index, "describe")
        if describe_ratio and describe.random() < describe_ratio:
            order = get_args(DescriptionOrder)[int(describe.integers(2))]
            question, answer = f"Describe the objects by {order}.", self.description(objects, order)
            return {"image": self.render(objects, rng), "question": question, "answer": answer, "type": "description"}
        target = objects[int(rng.integers(len(objects)))]
        kind = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
        if kind == "colour":
            question, answer = f"What colour is the {target.shape}?", target.colour
        elif kind == "shape":
            question, answer = f"What shape is the {target.colour} object?", target.shape
        elif kind == "count":
            question, answer = "How many objects are there?", str(len(objects))
        else:
            question, answer = f"Where is the {target.name}?", target.region(self.image_size)
        return {"image": self.render(objects, rng), "question": question, "answer": answer, "type": kind}

    def segmentation(self, index: int, max_objects: int = 3, classes: MaskClasses = "shape") -> dict:
        """A scene of :meth:`scene` and its pixel mask (:meth:`mask`): ``{image, mask}``."""
        objects, rng = self.scene(index, max_objects)
        return {"image": self.render(objects, rng), "mask": self.mask(objects, classes)}

    def description(self, objects: list[ShapeObject], order: DescriptionOrder = "shape") -> str:
        """Every object and its region, listed by ``order`` (``"shape"``: :data:`SHAPES` order; ``"colour"``:
        :data:`COLOURS` order): ``"a red circle at the top, a blue square at the centre"``.

        Why these orders and not reading order: listed in reading order, a model can name each region
        from the order in which it scans the image tokens, and learns neither to find an object by what
        it is nor to read a region off the object itself. Listed by shape, it must find each object by its
        shape and read its colour and region (as "What colour is the square?" and "Where is the red
        square?" ask); listed by colour, find it by colour and read its shape (as "What shape is the red
        object?"). Each order alone leaves the question it does not ask weaker, so :meth:`vqa` draws
        either; BENCHMARKS.md ("Embedded-default design choices") has the measurements.
        """
        if order not in get_args(DescriptionOrder):
            raise ValueError(f"Unknown description order {order!r}; choose 'shape' or 'colour'")
        names = SHAPES if order == "shape" else list(COLOURS)
        ordered = sorted(objects, key=lambda obj: names.index(getattr(obj, order)))
        return ", ".join(f"a {obj.name} at the {obj.region(self.image_size)}" for obj in ordered)

    def answer_options(self, kind: QuestionType, max_objects: int = 3) -> list[str]:
        """Every answer a question type can have: the chance level of a guess is one over their number."""
        return {
            "colour": list(COLOURS), "shape": list(SHAPES), "count": [str(n) for n in range(1, max_objects + 1)],
            "position": list(REGIONS),
        }[kind]  # fmt: skip

    def preference(self, index: int) -> dict:
        """A question with the right answer (chosen) and a wrong one of the same type (rejected)."""
        sample = self.vqa(index)
        rng = self.rng(index, "preference")
        wrong = [a for a in self.answer_options(sample["type"]) if a != sample["answer"]]
        return {
            "image": sample["image"], "question": sample["question"], "chosen": sample["answer"],
            "rejected": str(rng.choice(wrong)), "type": sample["type"],
        }  # fmt: skip

    def interleaved(self, index: int, num_images: int = 2) -> dict:
        """A document of pictures, each followed by the sentence that says what it shows:
        ``"<image> The image has a red circle at the top."`` — text a model can only predict from the picture
        before it (native multimodal pretraining's interleaved data, :class:`~lit_internvl.stages.NMPStage`)."""
        rng = self.rng(index, "interleaved")
        images, texts = [], []
        for _ in range(num_images):
            obj = self.random_object(rng)
            images.append(self.render([obj], rng))
            texts.append(f"{IMAGE_PLACEHOLDER} The image has a {obj.name} at the {obj.region(self.image_size)}.")
        return {"images": images, "texts": texts}

    def sentence(self, index: int) -> str:
        """A true sentence about the shapes world, for the text-only corpus."""
        rng = self.rng(index, "sentence")
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        return str(rng.choice((
            f"A {shape} has {CORNERS[shape]} corners.",
            f"The {colour} {shape} is one of {len(COLOURS) * len(SHAPES)} kinds of object.",
            f"Every {shape} can be {', '.join(list(COLOURS)[:-1])} or {list(COLOURS)[-1]}.",
        )))  # fmt: skip


def write_records(
    folder: str | Path, kind: RecordKind, count: int, seed: int = 0, split: Split = "train", image_size: int = 56
) -> Path:
    """Write ``count`` records of ``kind`` (pair, conversation, interleaved, text, preference) as
    ``folder/{kind}.jsonl`` with PNG images under ``folder/images/``; returns the jsonl path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(image_size, seed, split)

    def save(image: Image.Image, name: str) -> str:
        image.save(folder / "images" / name)
        return f"images/{name}"

    path = folder / f"{kind}.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            if kind == "pair":
                pair = world.pair(i)
                record = {"image": save(pair["image"], f"pair_{i}.png"), "text": pair["text"]}
            elif kind == "conversation":
                qa = world.vqa(i)
                question = f"{IMAGE_PLACEHOLDER}\n{qa['question']}"
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": qa["answer"]}]
                record = {"image": save(qa["image"], f"vqa_{i}.png"), "conversations": turns}
            elif kind == "interleaved":
                doc = world.interleaved(i)
                images = [save(image, f"doc_{i}_{j}.png") for j, image in enumerate(doc["images"])]
                record = {"images": images, "texts": doc["texts"]}
            elif kind == "text":
                record = {"text": world.sentence(i)}
            elif kind == "preference":
                pref = world.preference(i)
                texts = {k: pref[k] for k in ("question", "chosen", "rejected")}
                record = {"image": save(pref["image"], f"pref_{i}.png"), **texts}
            else:
                raise ValueError(f"Unknown record kind {kind!r}")
            f.write(json.dumps(record) + "\n")
    return path
