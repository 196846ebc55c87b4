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
steps          ``{"image": path (optional), "question": str, "steps": [str], "labels": ["+" | "-"]}``
               (a solution step by step, each step judged: a process-reward critic's data)
=============  ==========================================================================

A meta file lists datasets as InternVL's do: ``{name: {"root", "annotation", "repeat_time",
"max_dynamic_patch", "data_augment"}}`` (:func:`read_meta`). Every record carries a ``name``
(``file:line``) that error messages and skip logs use. :func:`index_records` scans an annotation
file once for byte offsets (never holding it whole); :func:`read_record` reads one record back;
:func:`encode_record`/:func:`decode_record` turn records into litdata items and back.

A record that cannot be trained on raises :class:`BadRecord` with one of :data:`SKIP_REASONS`:
skipped and counted by that name in lenient runs, the error (naming file and line) with ``strict``.
Texts may hold grounding boxes (:mod:`lit_internvl.data.grounding`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from lit_internvl.data.grounding import BoxError, BoxScale, convert_record
from lit_internvl.data.images import DEFAULT_MAX_PIXELS, UnusableImage, open_image

log = logging.getLogger(__name__)

RecordKind = Literal["pair", "conversation", "interleaved", "text", "preference", "steps"]
KINDS: tuple[RecordKind, ...] = get_args(RecordKind)
# Where an image (or a video's frames) goes in a record's text; the chat template expands it.
IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
# Who speaks a conversation turn (its "from"): the system message, the user, the assistant.
Role = Literal["system", "human", "gpt"]
ROLES: tuple[Role, ...] = get_args(Role)
# A step of a steps record is judged correct so far ("+") or not ("-"): the critic's two answers.
STEP_LABELS = ("+", "-")


# Every reason a record is skipped for, where it is found, what it means. A skip is counted as
# ``data/skipped/<reason, spaces as _>``; the README's bad-record table lists the same rows.
SKIP_REASONS: dict[str, str] = {
    "not UTF-8": "scan: a line with bytes that are not UTF-8",
    "malformed JSON": "scan: a line that is not JSON",
    "malformed record": "scan: JSON that is no record kind, or a field of the wrong type",
    "placeholder mismatch": "scan or build: <image> placeholders and images differ in number",
    "nothing to train": "scan or build: every answer empty, or no supervised token in the sample",
    "image outside root": "scan: an image path that leaves the image root (or is absolute)",
    "malformed box": "scan or prepare: a <box> that is not [[x1, y1, x2, y2], ...] with x1 ≤ x2, y1 ≤ y2",
    "box outside image": "scan or prepare: a box coordinate outside the image",
    "missing image": "read: an image file that does not exist or cannot be read",
    "empty image file": "read: an image file of zero bytes",
    "not an image": "read: bytes of none of the accepted image formats",
    "image too large": "read: width × height above the pixel limit (a decompression bomb)",
    "too many frames": "read: an animated or multi-page image file",
    "truncated image": "read: an image file that ends early",
    "corrupt image": "read: any other image decoding failure",
    "over-long sample": "build: more tokens than max_length (scan: a line longer than max_length's text, unread)",
}
# The further reason of litdata shards: an item whose bytes do not decode (a chunk overwritten or zeroed in part).
SHARD_SKIP_REASONS: dict[str, str] = {
    "corrupt shard record": "read: a shard item that does not decode, named by chunk file and item number",
}
# The reasons a packed batch drops a sample (lit_internvl.data.collate.Collator with pack: true), or a split
# document drops a part of itself (SampleOptions.split_long).
PACKING_SKIP_REASONS: dict[str, str] = {
    "too many tiles": "collate: more tiles than max_tiles_per_row, so no packed row can hold it",
    "empty split part": "build (split_long): a part of a document split between images with no trained token",
}
# The further reasons of image–caption data (the pair view of RecordsDataModule, lit_internvl.data.pairs).
PAIR_SKIP_REASONS: dict[str, str] = {
    "not a pair": "scan: a record that is not one image with its caption(s)",
    "empty caption": "build: a caption with no words once normalised",
    "no negative caption": "build: no caption of another image to pair the image with for ITM",
}


def counter_name(reason: str) -> str:
    """The metric a skip is counted under (:class:`~lit_internvl.callbacks.SkippedSamples`)."""
    return f"data/skipped/{reason.replace(' ', '_')}"


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
    augment: bool | None = None  # the dataset's data_augment, if it sets one


def detect_kind(obj: dict) -> str:
    if "conversations" in obj:
        return "conversation"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "steps" in obj:
        return "steps"
    if "texts" in obj:  # one image (a path) and several captions is a pair; a document has "images"
        return "pair" if isinstance(obj.get("image"), str) and "images" not in obj else "interleaved"
    if "text" in obj:
        return "pair" if "image" in obj else "text"
    raise ValueError("has none of the fields 'conversations', 'chosen'/'rejected', 'steps', 'texts', 'text'")


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
        elif kind == "steps":
            images = _parse_steps(obj, name)
        else:
            for key in ("image", "question", "chosen", "rejected"):
                if key not in obj:
                    raise ValueError(f"a preference record needs {key!r}")
            for key in ("question", "chosen", "rejected"):
                if not isinstance(obj[key], str):
                    raise ValueError(f"{key!r} must be a string, got {obj[key]!r}")
            images = _strings(obj["image"], "'image'")
        record = Record(kind, name, obj, images, is_video, max_tiles)
        check_something_to_train(record)
        return record
    except BadRecord:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise BadRecord(name, "malformed record", str(error)) from None


def _parse_steps(obj: dict, name: str) -> list[str]:
    """A step-labelled record's checks (:mod:`lit_internvl.data.critic`); returns its image paths."""
    question, steps, labels = obj.get("question"), obj["steps"], obj.get("labels")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"a steps record needs a non-empty 'question' string, got {question!r}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError(f"'steps' must be a non-empty list of non-empty strings, got {steps!r}")
    if not isinstance(labels, list) or len(labels) != len(steps) or not all(label in STEP_LABELS for label in labels):
        raise ValueError(f"'labels' must be one of {STEP_LABELS} per step ({len(steps)} steps), got {labels!r}")
    images = _strings(obj["image"], "'image'") if "image" in obj else []
    placeholders = question.count(IMAGE_PLACEHOLDER) + sum(s.count(IMAGE_PLACEHOLDER) for s in steps)
    if placeholders != len(images) and not (placeholders == 0 and len(images) == 1):
        raise _placeholder_mismatch(name, placeholders, len(images))
    return images


def check_something_to_train(record: Record) -> None:
    """Raise :class:`BadRecord` ``nothing to train`` when every text a record would train is blank:
    all of a conversation's answers, a preference's chosen answer, an interleaved document's text
    around its images. (The end token after an empty answer would be trained, but it teaches only
    to stop: the record is a labelling accident, reported rather than trained.)"""
    fields = record.fields
    if record.kind == "conversation":
        trained = [t["value"] for t in fields["conversations"] if t["from"] == "gpt"]
    elif record.kind == "preference":
        trained = [fields["chosen"]]
    elif record.kind == "interleaved":
        trained = [t.replace(IMAGE_PLACEHOLDER, "") for t in fields["texts"]]
    else:  # pair, text, steps: a blank text (question, step) is already a malformed record
        return
    if not any(text.strip() for text in trained):
        what = {"conversation": "every answer", "preference": "the chosen answer", "interleaved": "all text"}
        raise BadRecord(record.name, "nothing to train", f"{what[record.kind]} is empty")


@dataclass
class DatasetSpec:
    """One entry of an InternVL meta file (or one jsonl file).

    ``repeat_time``: a fraction keeps the file's first ⌊lines·r⌋ lines, a whole number > 1 repeats
    them; ``max_dynamic_patch`` replaces the datamodule's ``max_tiles`` for this dataset (it may
    raise it); ``data_augment`` turns the JPEG augmentation on or off for this dataset (None: the
    datamodule's setting); ``allow_absolute_paths`` lets records name images outside ``root`` by
    absolute path (relative paths must stay inside ``root`` either way).
    """

    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1
    max_dynamic_patch: int | None = None
    data_augment: bool | None = None
    allow_absolute_paths: bool = False


def _meta_error(path: Path, name: str, option: str, message: str) -> ValueError:
    return ValueError(f"{path}: dataset {name!r}: {option} {message}")


def check_repeat_time(value, where: str = "repeat_time") -> float:
    """InternVL's ``repeat_time`` (``internvl_chat_finetune.py``, lines 339–345): ``0 < r < 1`` keeps
    the first ⌊n·r⌋ lines, ``r > 1`` must be a whole number of copies (the reference asserts an
    int). Returns ``r``; raises ``ValueError`` naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{where} is {value}; it must be > 0")
    if value > 1 and value != int(value):
        raise ValueError(f"{where} is {value}; above 1 it must be a whole number of copies (as in InternVL)")
    return int(value) if value >= 1 else float(value)


# How a meta entry's relative paths are read. InternVL opens ``root`` and ``annotation`` as given, so
# relative to the working directory (``internvl_chat_finetune.py``: ``open(meta['annotation'])``,
# line 337; ``os.path.join(self.root, image_path)``, line 411); lit_internvl reads them from the
# meta file's folder, so that a meta file means the same wherever a run starts. read_meta warns
# when the two readings name different paths and the working-directory one exists.


def _warn_if_cwd_differs(path: Path, name: str, option: str, ours: Path, value: str) -> None:
    theirs = Path(value)
    if theirs.resolve() != ours.resolve() and theirs.exists():
        log.warning(
            "%s: dataset %r: %s %r is read from the meta file's folder as %s; InternVL would read %s "
            "(relative to the working directory), which also exists", path, name, option, value, ours,
            theirs.resolve(),
        )  # fmt: skip


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """InternVL meta file: ``{name: {"root", "annotation", "repeat_time"?, "max_dynamic_patch"?,
    "data_augment"?}}``. Relative paths are taken from the meta file's folder (InternVL: the working
    directory; a warning says when the two differ and that one exists). A bad option raises
    ``ValueError`` naming the file, the dataset and the option."""
    path = Path(path)
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: a meta file is a non-empty JSON object of datasets")
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: dataset {name!r} must be a JSON object, got {entry!r}")
        for key in ("annotation", "root"):
            if not isinstance(entry.get(key), str):
                raise _meta_error(path, name, key, "is missing (a path string is needed)")
        try:
            repeat = check_repeat_time(entry.get("repeat_time", 1))
        except ValueError as error:
            raise ValueError(f"{path}: dataset {name!r}: {error}") from None
        tiles = entry.get("max_dynamic_patch")
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
            raise _meta_error(path, name, "max_dynamic_patch", f"must be an integer ≥ 1, got {tiles!r}")
        augment = entry.get("data_augment")
        if augment is not None and not isinstance(augment, bool):
            raise _meta_error(path, name, "data_augment", f"must be true or false, got {augment!r}")
        annotation, root = path.parent / entry["annotation"], path.parent / entry["root"]
        _warn_if_cwd_differs(path, name, "annotation", annotation, entry["annotation"])
        _warn_if_cwd_differs(path, name, "root", root, entry["root"])
        if not root.is_dir():
            raise _meta_error(path, name, "root", f"{root} is not a folder")
        specs.append(DatasetSpec(name, annotation, root, repeat, tiles, augment))
    return specs


def kept_lines(lines: int, repeat_time: float) -> tuple[int, int]:
    """``(first, copies)``: InternVL's ``repeat_time`` keeps the first ``first`` lines of a file of
    ``lines`` lines, ``copies`` times. ``int(lines · r)`` as the reference computes it (so float
    rounding decides: 100 lines at 0.29 keep 28)."""
    if repeat_time < 1:
        return int(lines * repeat_time), 1
    return lines, int(repeat_time)


class SkipCounter:
    """Counts skipped records by reason, lists them (``records``: each one's ``{"name", "reason"}``) and logs each
    skip with the record's name."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.records: list[dict] = []

    def skip(self, error: BadRecord) -> None:
        self.counts[error.reason] += 1
        self.records.append({"name": error.name, "reason": error.reason})
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
    """:func:`pack_images`' images; a ``ValueError`` when the count and lengths do not fit the blob (a corrupt shard
    could otherwise ask for billions of lengths)."""
    blob = bytes(blob)  # litdata hands out memoryviews, which must not leave a worker
    count = int.from_bytes(blob[:4], "little")
    if len(blob) < 4 or 4 + 4 * count > len(blob):
        raise ValueError(f"an image pack of {len(blob)} bytes cannot hold {count} images")
    lengths = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "little") for i in range(count)]
    if 4 + 4 * count + sum(lengths) > len(blob):
        raise ValueError(f"an image pack of {len(blob)} bytes cannot hold images of {sum(lengths)} bytes")
    out, offset = [], 4 + 4 * count
    for length in lengths:
        out.append(blob[offset : offset + length])
        offset += length
    return out


def resolve_image_path(root: str | Path, path: str, allow_absolute: bool = False) -> str:
    """``root / path``, refusing a path that leaves ``root`` (``"../../etc/passwd"``) and, unless
    ``allow_absolute``, an absolute one. The check is on the path as written (``..`` collapsed,
    symbolic links not followed): a link the dataset's owner put inside ``root`` is theirs to make,
    a ``..`` in a record is not. Raises ``ValueError`` naming the path."""
    if Path(path).is_absolute():
        if allow_absolute:
            return os.path.normpath(path)
        raise ValueError(f"{path!r} is absolute (allow_absolute_paths is off)")
    base = os.path.abspath(root)  # absolute and normalised, links untouched: "." and "data/" compare too
    joined = os.path.abspath(os.path.join(base, path))
    if os.path.commonpath([base, joined]) != base:
        raise ValueError(f"{path!r} resolves to {joined!r}, outside the image root {base!r}")
    return joined


def _resolve_images(record: Record, spec: DatasetSpec) -> list[str]:
    try:
        return [resolve_image_path(spec.root, p, spec.allow_absolute_paths) for p in record.images]
    except ValueError as error:
        raise BadRecord(record.name, "image outside root", str(error)) from None


def open_images(record: Record, root: str | Path | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list:
    """PIL images of a record, RGB, from its paths (under ``root``), its encoded bytes, or PIL images.

    Every file is checked before it is decoded (:func:`lit_internvl.data.images.open_image`: empty,
    not an image, over ``max_pixels``, several frames) and while (truncated, corrupt); a failure
    raises :class:`BadRecord` naming the record, the image and the reason.
    """
    from PIL import Image

    images = []
    for item in record.images:
        if isinstance(item, Image.Image):  # generated in memory (the shapes world)
            images.append(item.convert("RGB"))
            continue
        label = item if isinstance(item, str) else f"image {len(images)}"
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                images.append(open_image(item, max_pixels))
            else:
                images.append(open_image(Path(root) / item if root is not None else Path(item), max_pixels))
        except FileNotFoundError as error:
            raise BadRecord(record.name, "missing image", f"{error.filename or item!r} does not exist") from None
        except UnusableImage as error:
            raise BadRecord(record.name, error.reason, f"{label!r}: {error.detail}") from None
        except OSError as error:  # a folder, no permission: open_image turns PIL's own errors into UnusableImage
            raise BadRecord(record.name, "missing image", f"{label!r} cannot be read: {error}") from None
    return images


def _decode_line(line: bytes, name: str):
    """One annotation line → its JSON value; a BOM at the start is allowed, other non-UTF-8 bytes are not."""
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        detail = f"byte {error.start} (0x{line[error.start]:02x}) is not UTF-8; re-encode the file as UTF-8"
        raise BadRecord(name, "not UTF-8", detail) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError; an int of over 4,300 digits; deep nesting
        raise BadRecord(name, "malformed JSON", str(error) or type(error).__name__) from None


def _check_boxes(record: Record, box_scale: BoxScale) -> None:
    """Boxes that can be checked without the image (``unit`` and ``1000`` scales)."""
    if box_scale != "pixel":
        try:
            convert_record(record.kind, record.fields, box_scale)
        except BoxError as error:
            raise BadRecord(record.name, error.reason, error.detail) from None


def index_records(
    spec: DatasetSpec, strict: bool, skips: SkipCounter, box_scale: BoxScale = "1000", max_line_bytes: int | None = None
) -> list[tuple]:
    """Work items ``(byte offset, name, spec)`` of one dataset's valid lines after ``repeat_time``
    (:func:`kept_lines`). Reads the file line by line (never whole) and checks what needs no image:
    UTF-8, JSON, fields, image paths inside the root, something to train, boxes in ``box_scale``
    (pixel boxes need the image: :func:`encode_record` checks them). A line longer than ``max_line_bytes`` is an
    over-long sample without being read whole. Bad lines are skipped and counted in ``skips``, or raised with
    ``strict``."""
    first, copies = kept_lines(_count_lines(spec.annotation), spec.repeat_time)
    items = []
    with open(spec.annotation, "rb") as f:
        offset = 0
        for number, (line, length) in enumerate(_lines(f, max_line_bytes), start=1):
            if number > first:
                break
            name = f"{spec.annotation.name}:{number}"
            if line is None:
                detail = f"a line of {length} bytes, more text than max_length tokens hold ({max_line_bytes} bytes)"
                _bad(BadRecord(name, "over-long sample", detail + ": not read"), strict, skips)
            elif line.strip():
                try:
                    record = parse_record(_decode_line(line, name), name)
                    _resolve_images(record, spec)
                    _check_boxes(record, box_scale)
                    items.append((offset, name, spec))
                except BadRecord as error:
                    _bad(error, strict, skips)
            offset += length
    return items * copies


def _lines(f, limit: int | None):
    """``(line, length)`` of each line of the binary file ``f``; ``line`` is None for a line longer than ``limit``
    bytes, which is read past in pieces, never held whole."""
    while True:
        line = f.readline() if limit is None else f.readline(limit + 1)
        if not line:
            return
        if limit is None or len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        length = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            if not line:
                break
            length += len(line)
        yield None, length


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _bad(error: BadRecord, strict: bool, skips: SkipCounter) -> None:
    if strict:
        raise error
    skips.skip(error)


def read_record(item: tuple) -> Record:
    """The record behind an :func:`index_records` item: image paths resolved under its dataset's root,
    its dataset's ``max_dynamic_patch`` and ``data_augment`` attached."""
    offset, name, spec = item
    with open(spec.annotation, "rb") as f:
        f.seek(offset)
        record = parse_record(_decode_line(f.readline(), name), name, spec.max_dynamic_patch)
    record.images = _resolve_images(record, spec)
    record.augment = spec.data_augment
    return record


def encode_record(item: tuple, strict: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS, box_scale: BoxScale = "1000"):
    """litdata worker function: one work item → ``{"record": json, "images": packed bytes}``, its boxes
    on the 0–1000 grid, or nothing (a bad image or box, logged; raised with ``strict``)."""
    try:
        record = read_record(item)
        images = open_images(record, max_pixels=max_pixels)  # decodable? (raises BadRecord naming the record)
        try:
            fields = convert_record(record.kind, record.fields, box_scale, [image.size for image in images])
        except BoxError as error:
            raise BadRecord(record.name, error.reason, error.detail) from None
    except BadRecord as error:
        if strict:
            raise
        log.warning("skipping %s", error)
        return
    meta = {
        "kind": record.kind, "name": record.name, "fields": fields, "is_video": record.is_video,
        "max_tiles": record.max_tiles, "augment": record.augment,
    }  # fmt: skip
    yield {"record": json.dumps(meta), "images": pack_images([Path(p).read_bytes() for p in record.images])}


def decode_shard_item(dataset, index, item: dict) -> Record:
    """:func:`decode_record` of the item ``index`` of a litdata ``dataset``; an item that does not decode (bytes of a
    chunk overwritten or zeroed) is a :class:`BadRecord` named by its chunk file and item number, a counted skip."""
    try:
        return decode_record(item)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = f"{type(error).__name__}: {error}"
        raise BadRecord(shard_item_name(dataset, index), "corrupt shard record", reason) from None


def shard_item_name(dataset, index) -> str:
    """``<shards>/<chunk file> item <n>``: where a litdata item lives, for messages."""
    chunk, number = getattr(index, "chunk_index", None), getattr(index, "index", index)
    try:
        filename = dataset.cache._reader.config._chunks[chunk]["filename"]
    except (AttributeError, IndexError, KeyError, TypeError):
        filename = f"chunk {chunk}"
    folder = getattr(dataset.input_dir, "path", None) or getattr(dataset.input_dir, "url", None) or "shards"
    return f"{folder}/{filename} item {number}"


REMOTE_PREFIXES = ("s3://", "gs://", "az://", "hf://")  # shards in object storage: litdata fetches their chunks


def check_chunks(folder: str | Path) -> None:
    """A local shard folder's chunk files are all there and as long as its ``index.json`` says: a truncated chunk
    (a copy cut short, a full disk during ``prepare``) is an error naming it, where litdata would wait for it as
    for a download and then time out. An ``index.json`` that does not parse is an error naming it too."""
    index = Path(folder) / "index.json"
    try:
        chunks = json.loads(index.read_text())["chunks"]
        expected = {chunk["filename"]: int(chunk["chunk_bytes"]) for chunk in chunks}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a litdata index ({type(error).__name__}: {error}); re-run prepare") from None
    for filename, size in expected.items():
        path = Path(folder) / filename
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes where {index.name} says {size}: truncated"
            raise ValueError(f"shard chunk {path} is {what}; re-run prepare (or copy the shards again)")


def decode_record(item: dict) -> Record:
    """A streamed shard item back to a :class:`Record` whose images are encoded bytes."""
    meta = json.loads(item["record"])
    images = unpack_images(item["images"])
    record = Record(meta["kind"], meta["name"], meta["fields"], images, meta["is_video"], meta["max_tiles"])
    record.augment = meta.get("augment")  # shards written before data_augment have none
    return record
