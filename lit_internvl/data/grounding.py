"""Grounding: boxes in a record's text, ``<ref>a red square</ref><box>[[x1, y1, x2, y2]]</box>``,
checked against the image and converted to InternVL's 0–1000 grid.

InternVL trains and answers grounding with boxes on an integer grid of 0–1000 over the *whole*
image (``x`` along the width, ``y`` along the height, top-left origin), whatever the tiling: its
RefCOCO evaluation maps an answer back to pixels as ``v / 1000 · size``
(``internvl_chat/eval/refcoco/evaluate_grounding.py``, lines 197–200), and its demo parses
``<ref>…</ref><box>[[…]]</box>`` spans (``streamlit_demo/app.py``, line 195). One ``<box>`` may hold
several boxes, ``[[…], […]]``.

Records may be written in three scales (:data:`BoxScale`); ``prepare --box-scale`` converts them:

=========  ===========================  ============================================
scale      a coordinate v lies in        on the 0–1000 grid
=========  ===========================  ============================================
pixel      ``[0, width]`` / ``[0, height]``  ``round(1000 · v / size)``
unit       ``[0, 1]``                    ``round(1000 · v)``
1000       ``[0, 1000]``                 ``round(v)``
=========  ===========================  ============================================

``round`` is to the nearest integer, halves up. The reference ships no converter (its grounding data
come on the grid); the nearest grid point is the one its ``v / 1000 · size`` maps back closest to
the original, within ``size / 2000``. A box that leaves the image (a coordinate outside its scale's
range) is a bad record, ``box outside image``; a box that is not four numbers with ``x1 ≤ x2`` and
``y1 ≤ y2``, or an unclosed tag, is ``malformed box``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Literal, get_args

BoxScale = Literal["pixel", "unit", "1000"]
BOX_SCALES: tuple[BoxScale, ...] = get_args(BoxScale)
GRID = 1000  # InternVL's box grid: integer coordinates 0..1000
BOX_START, BOX_END = "<box>", "</box>"
_BOX = re.compile(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), re.DOTALL)

Size = tuple[int, int]  # (width, height) of the whole image


class BoxError(ValueError):
    """A box that cannot be trained on; ``reason`` is ``box outside image`` or ``malformed box``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_boxes(span: str) -> list[list[float]]:
    """The boxes of one ``<box>`` span's inside, ``"[[x1, y1, x2, y2], …]"`` → lists of four numbers."""
    try:
        boxes = json.loads(span)
    except json.JSONDecodeError:
        boxes = None
    numbers = (int, float)
    if not (
        isinstance(boxes, list)
        and boxes
        and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, numbers) and not isinstance(v, bool) for v in b)
            for b in boxes
        )
    ):
        raise BoxError("malformed box", f"{BOX_START}{span}{BOX_END} is not [[x1, y1, x2, y2], ...]")
    for x1, y1, x2, y2 in boxes:
        if not (x1 <= x2 and y1 <= y2):
            raise BoxError("malformed box", f"[{x1}, {y1}, {x2}, {y2}] needs x1 ≤ x2 and y1 ≤ y2")
    return boxes


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def to_grid(box: list[float], scale: BoxScale, size: Size | None = None) -> list[int]:
    """One box in ``scale`` → the 0–1000 grid, after checking it lies inside the image.

    ``size`` (width, height) is needed for ``pixel`` only. Raises :class:`BoxError` ``box outside
    image`` when a coordinate leaves its scale's range.
    """
    if scale == "pixel":
        if size is None:
            raise ValueError("pixel boxes need the image's (width, height)")
        limits = (size[0], size[1], size[0], size[1])
    else:
        limits = (1.0,) * 4 if scale == "unit" else (GRID,) * 4
    if not all(0 <= v <= limit for v, limit in zip(box, limits)):
        raise BoxError("box outside image", f"{box} leaves the image (scale {scale}, limits {list(limits)})")
    return [_half_up(GRID * v / limit) for v, limit in zip(box, limits)]


def format_boxes(boxes: list[list[int]]) -> str:
    """Grid boxes → one ``<box>[[x1, y1, x2, y2], …]</box>`` span, as InternVL writes them."""
    return BOX_START + json.dumps(boxes) + BOX_END


def convert_text(text: str, scale: BoxScale, size: Size | None = None) -> str:
    """``text`` with every ``<box>`` span checked and rewritten on the 0–1000 grid (other text as is)."""
    if text.count(BOX_START) != text.count(BOX_END) or len(_BOX.findall(text)) != text.count(BOX_START):
        raise BoxError("malformed box", f"unbalanced {BOX_START}…{BOX_END} in {text!r}")
    return _BOX.sub(lambda m: format_boxes([to_grid(b, scale, size) for b in parse_boxes(m.group(1))]), text)


def map_texts(kind: str, fields: dict, fn: Callable[[str], str]) -> dict:
    """A copy of a record's fields with ``fn`` applied to each of its texts (every string a sample reads)."""
    fields = dict(fields)

    def each(value):  # a caption may be a list of captions
        return [fn(v) for v in value] if isinstance(value, list) else fn(value)

    if kind == "conversation":
        fields["conversations"] = [{**turn, "value": fn(turn["value"])} for turn in fields["conversations"]]
    elif kind == "interleaved":
        fields["texts"] = [fn(text) for text in fields["texts"]]
    elif kind == "preference":
        fields.update({key: each(fields[key]) for key in ("question", "chosen", "rejected")})
    elif kind == "steps":
        fields.update(question=fn(fields["question"]), steps=[fn(step) for step in fields["steps"]])
    else:  # pair (one caption, or several in "texts"), text
        key = "text" if "text" in fields else "texts"
        fields[key] = each(fields[key])
    return fields


def has_boxes(kind: str, fields: dict) -> bool:
    found = []
    map_texts(kind, fields, lambda text: found.append(BOX_START in text or BOX_END in text) or text)
    return any(found)


def convert_record(kind: str, fields: dict, scale: BoxScale, sizes: list[Size] | None = None) -> dict:
    """A record's fields with all boxes on the 0–1000 grid. Pixel boxes need exactly one image's
    size (``sizes``): a box of a multi-image record could be on any of them."""
    if not has_boxes(kind, fields):
        return fields
    size = None
    if scale == "pixel":
        if not sizes or len(sizes) != 1:
            count = len(sizes or [])
            raise BoxError("malformed box", f"pixel boxes need exactly one image to scale by, the record has {count}")
        size = sizes[0]
    return map_texts(kind, fields, lambda text: convert_text(text, scale, size))
