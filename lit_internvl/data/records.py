"""Records: the one-JSON-object-per-line formats lit_internvl trains on, validated on read.

=============  ==========================================================================
kind           fields
=============  ==========================================================================
pair           ``{"image": path, "text": caption}`` or ``{"image": path, "texts": [captions]}``
conversation   ``{"image": path | [paths] (optional), "conversations": [{"from", "value"}]}``
               (InternVL/LLaVA format; ``<image>`` placeholders; ``"video": [frame paths]``
               marks frames that get one tile each)
interleaved    ``{"images": [paths], "texts": [str]}``; the texts hold one ``<image>`` per image
text           ``{"text": str}``
preference     ``{"image": path, "question": str, "chosen": str, "rejected": str}``
=============  ==========================================================================

A meta file lists datasets as InternVL's do: ``{name: {"root", "annotation", "repeat_time",
"max_dynamic_patch"}}``. Every record carries a ``name`` (``file:line``) that error messages and
skip logs use. :func:`index_records` scans an annotation file once for byte offsets (never holding
it whole); :func:`read_record` reads one record back; :func:`encode_record`/:func:`decode_record`
turn records into litdata items and back.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

log = logging.getLogger(__name__)

RecordKind = Literal["pair", "conversation", "interleaved", "text", "preference"]
KINDS: tuple[RecordKind, ...] = get_args(RecordKind)
# Where an image (or a video's frames) goes in a record's text; the chat template expands it.
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
# Who speaks a conversation turn (its "from"): the system message, the user, the assistant.
Role = Literal["system", "human", "gpt"]
ROLES: tuple[Role, ...] = get_args(Role)


class BadRecord(ValueError):
    """A record that cannot become a training sample. ``reason`` is a short counter key."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"{name}: {reason}: {detail}")
        self.name, self.reason, self.detail = name, reason, detail


@dataclass
class Record:
    kind: RecordKind
    name: str  # "annotation.jsonl:12": where the record came from, for messages
    fields: dict
    images: list = field(default_factory=list)  # paths (str) as read; encoded bytes once prepared
    is_video: bool = False
    max_tiles: int | None = None  # the dataset's max_dynamic_patch, if it sets one


def detect_kind(obj: dict) -> str:
    if "conversations" in obj:
        return "conversation"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "texts" in obj:  # one image (a path) and several captions is a pair; a document has "images"
        return "pair" if isinstance(obj.get("image"), str) and "images" not in obj else "interleaved"
    if "text" in obj:
        return "pair" if "image" in obj else "text"
    raise ValueError("has none of the fields 'conversations', 'chosen'/'rejected', 'texts', 'text'")


def _strings(value, what: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{what} must be a non-empty string or a list of them, got {value!r}")
    return values


def _placeholder_mismatch(name: str, placeholders: int, images: int) -> BadRecord:
    detail = f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {images} image(s)"
    return BadRecord(name, "placeholder mismatch", detail)


def parse_record(obj, name: str, max_tiles: int | None = None) -> Record:
    """Validate one decoded JSON value; raise :class:`BadRecord` naming ``name`` if it is not a record."""
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        kind = detect_kind(obj)
        images: list[str] = []
        is_video = False
        if kind == "conversation":
            turns = obj["conversations"]
            if not isinstance(turns, list) or not turns:
                raise ValueError("'conversations' must be a non-empty list")
            for i, turn in enumerate(turns):
                if not (isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
                    roles = "|".join(map(repr, ROLES))
                    raise ValueError(f"turn {i} must be {{'from': {roles}, 'value': str}}, got {turn!r}")
            if not any(t["from"] == "gpt" for t in turns):
                raise ValueError("no 'gpt' turn to learn from")
            if "video" in obj:
                images, is_video = _strings(obj["video"], "'video'"), True
            elif "image" in obj or "images" in obj:
                images = _strings(obj.get("image", obj.get("images")), "'image'")
            placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
            # No placeholder with one image is InternVL's convention (the image goes first);
            # otherwise every image needs its placeholder.
            if placeholders != len(images) and not (placeholders == 0 and len(images) == 1):
                raise _placeholder_mismatch(name, placeholders, len(images))
        elif kind == "pair":
            images = _strings(obj["image"], "'image'")
            _strings(obj["text"], "'text'") if "text" in obj else _strings(obj["texts"], "'texts'")
        elif kind == "interleaved":
            images = _strings(obj["images"], "'images'") if obj.get("images") else []
            texts = obj["texts"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("'texts' must be a list of strings")
            placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
            if placeholders != len(images):
                raise _placeholder_mismatch(name, placeholders, len(images))
        elif kind == "text":
            _strings(obj["text"], "'text'")
        else:
            for key in ("image", "question", "chosen", "rejected"):
                if key not in obj:
                    raise ValueError(f"a preference record needs {key!r}")
            images = _strings(obj["image"], "'image'")
        return Record(kind, name, obj, images, is_video, max_tiles)
    except BadRecord:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise BadRecord(name, "malformed record", str(error)) from None


@dataclass
class DatasetSpec:
    """One entry of an InternVL meta file."""

    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """InternVL meta file: ``{name: {"root", "annotation", "repeat_time"?, "max_dynamic_patch"?}}``.
    Relative paths are taken from the meta file's folder."""
    path = Path(path)
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: a meta file is a non-empty JSON object of datasets")
    specs = []
    for name, entry in meta.items():
        for key in ("annotation", "root"):
            if key not in entry:
                raise ValueError(f"{path}: dataset {name!r} has no {key!r}")
        repeat = float(entry.get("repeat_time", 1.0))
        if repeat <= 0:
            raise ValueError(f"{path}: dataset {name!r} has repeat_time {repeat}; it must be > 0")
        annotation, root = path.parent / entry["annotation"], path.parent / entry["root"]
        specs.append(DatasetSpec(name, annotation, root, repeat, entry.get("max_dynamic_patch")))
    return specs


def repeat_indices(count: int, repeat_time: float, seed: int = 0) -> list[int]:
    """Indices of a dataset after InternVL's ``repeat_time``: whole copies for the integer part, a
    seeded random subset for the fraction (0.5 keeps half the records, 2.5 two and a half copies)."""
    import random

    whole, fraction = int(math.floor(repeat_time)), repeat_time - math.floor(repeat_time)
    indices = list(range(count)) * whole
    if fraction > 0:
        indices += sorted(random.Random(seed).sample(range(count), int(round(count * fraction))))
    return indices


class SkipCounter:
    """Counts skipped records by reason and logs each skip with the record's name."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def skip(self, error: BadRecord) -> None:
        self.counts[error.reason] += 1
        log.warning("skipping %s", error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def pack_images(images: list[bytes]) -> bytes:
    """Several encoded images in one bytes field (litdata needs one fixed layout per sample):
    a count, the lengths, then the files, as little-endian uint32s and raw bytes."""
    header = len(images).to_bytes(4, "little") + b"".join(len(b).to_bytes(4, "little") for b in images)
    return header + b"".join(images)


def unpack_images(blob: bytes) -> list[bytes]:
    blob = bytes(blob)  # litdata hands out memoryviews, which must not leave a worker
    count = int.from_bytes(blob[:4], "little")
    lengths = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "little") for i in range(count)]
    out, offset = [], 4 + 4 * count
    for length in lengths:
        out.append(blob[offset : offset + length])
        offset += length
    return out


def open_images(record: Record, root: str | Path | None = None) -> list:
    """PIL images of a record, RGB, from its paths (under ``root``), its encoded bytes, or PIL images.

    A missing or undecodable image raises :class:`BadRecord` naming the record and the image.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    images = []
    for item in record.images:
        if isinstance(item, Image.Image):  # generated in memory (the shapes world)
            images.append(item.convert("RGB"))
            continue
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                image = Image.open(io.BytesIO(bytes(item)))
            else:
                path = Path(root) / item if root is not None else Path(item)
                image = Image.open(path)
            image.load()
            images.append(image.convert("RGB"))
        except FileNotFoundError as error:
            raise BadRecord(record.name, "missing image", f"{error.filename or item!r} does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            label = item if isinstance(item, str) else f"image {len(images)}"
            raise BadRecord(record.name, "corrupt image", f"{label!r}: {error}") from None
    return images


def index_records(spec: DatasetSpec, strict: bool, skips: SkipCounter) -> list[tuple]:
    """Work items ``(annotation, byte offset, name, root, max_tiles)`` of one dataset's valid lines,
    repeated by ``repeat_time``. Reads the file once, line by line (never whole)."""
    items = []
    with open(spec.annotation, "rb") as f:
        offset, number = 0, 0
        for line in f:
            number += 1
            name = f"{spec.annotation.name}:{number}"
            if line.strip():
                try:
                    parse_record(json.loads(line), name)
                    items.append((str(spec.annotation), offset, name, str(spec.root), spec.max_dynamic_patch))
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    _bad(BadRecord(name, "malformed JSON", str(error)), strict, skips)
                except BadRecord as error:
                    _bad(error, strict, skips)
            offset += len(line)
    return [items[i] for i in repeat_indices(len(items), spec.repeat_time)]


def _bad(error: BadRecord, strict: bool, skips: SkipCounter) -> None:
    if strict:
        raise error
    skips.skip(error)


def read_record(item: tuple) -> Record:
    """The record behind an :func:`index_records` item, its image paths resolved under its dataset's root."""
    annotation, offset, name, root, max_tiles = item
    with open(annotation, "rb") as f:
        f.seek(offset)
        record = parse_record(json.loads(f.readline()), name, max_tiles)
    record.images = [str(Path(root) / path) for path in record.images]
    return record


def encode_record(item: tuple, strict: bool):
    """litdata worker function: one work item → ``{"record": json, "images": packed bytes}``, or
    nothing (a missing or corrupt image, logged; raised with ``strict``)."""
    record = read_record(item)
    try:
        open_images(record)  # decodable? (raises BadRecord naming the record)
    except BadRecord as error:
        if strict:
            raise
        log.warning("skipping %s", error)
        return
    meta = {
        "kind": record.kind, "name": record.name, "fields": record.fields, "is_video": record.is_video,
        "max_tiles": record.max_tiles,
    }  # fmt: skip
    yield {"record": json.dumps(meta), "images": pack_images([Path(p).read_bytes() for p in record.images])}


def decode_record(item: dict) -> Record:
    """A streamed shard item back to a :class:`Record` whose images are encoded bytes."""
    meta = json.loads(item["record"])
    images = unpack_images(item["images"])
    return Record(meta["kind"], meta["name"], meta["fields"], images, meta["is_video"], meta["max_tiles"])
