"""The "shapes" world: the generated, seeded data set behind every embedded-default recipe.

Each scene is a small image with coloured geometric objects on a dark, noisy background. Everything
about a scene is a pure function of ``(seed, split, index)``, so any sample can be regenerated
anywhere (a data-loader worker, another rank) and train/validation splits never share a scene.
Stage 1 uses :meth:`ShapesWorld.pair` (one object and a caption); later stages draw questions and
answers, interleaved documents and preference pairs from the same scenes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
SPLITS = ("train", "val", "test")


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

    def region(self, image_size: int) -> str:
        col, row = (min(int(3 * c / image_size), 2) for c in self.centre)
        return REGIONS[3 * row + col]


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


class ShapesWorld:
    """Deterministic scenes: ``world.scene(i)`` is the same on every call, process and machine."""

    def __init__(self, image_size: int = 56, seed: int = 0, split: str = "train") -> None:
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
            colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)), centre=(float(cx), float(cy)),
            radius=radius,
        )

    def render(self, objects: list[ShapeObject], rng: np.random.Generator) -> Image.Image:
        size = self.image_size
        background = rng.uniform(0, 60) + rng.normal(0, 8, size=(size, size, 1)) + rng.uniform(-10, 10, size=3)
        image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for obj in objects:
            shade = rng.uniform(0.8, 1.0)
            fill = tuple(int(c * shade) for c in COLOURS[obj.colour])
            (cx, cy), r = obj.centre, obj.radius
            if obj.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif obj.shape == "square":
                a = 0.8 * r
                draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
            else:
                draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
        return image

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
