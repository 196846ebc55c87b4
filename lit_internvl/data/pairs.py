"""Image–caption pairs for the dual-encoder stages (InternVL-C, InternVL-G), as OpenGVLab/InternVL's
``internvl_g`` trains them: the caption text forms, the image transforms and the pair datasets.

One caption becomes four token sequences (:func:`caption_sample`), a pair sample adds its image and
the ITM form of a caption of another image (the negative):

    caption ─► normalise (lower-case, drop . ! " ( ) * # : ; ~, ≤ 50 words)
       ├─► ITC: "summarize:" + caption + end        (input_ids; a last-token text tower pools the end)
       ├─► ITM: caption + end                       (itm_ids; the negative: another image's caption)
       └─► ITG: "English caption:" + caption + end  (itg_ids; itg_labels -100 on the prefix, unshifted)

A sample is ``{"pixel_values" (3, S, S), "input_ids", "itm_ids", "negative_ids" (only when the stage asks for the
``negative`` view), "itg_ids", "itg_labels" (L,) each, "label", "caption_key", "image_id", "name"}``; :class:`~lit_internvl.data.collate.PairCollator`
pads them into the pair batch. Records (jsonl, meta files, prepared shards) give one sample per caption:
``{"image": path, "text": caption}`` or ``{"image": path, "texts": [captions]}``, optionally ``"label": int``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from litdata import StreamingDataset
from PIL import Image
from torch.utils.data import Dataset

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.images import DEFAULT_MAX_PIXELS, to_tensor
from lit_internvl.data.records import (
    REMOTE_PREFIXES,
    BadRecord,
    Record,
    SkipCounter,
    check_chunks,
    decode_shard_item,
    index_records,
    open_images,
    read_record,
)

log = logging.getLogger(__name__)

# How many draws the negative caption gets before the sample counts as bad (a dataset of one image
# and its near-copies); each draw that lands on the same image or an unusable caption is redrawn.
NEGATIVE_DRAWS = 64


@dataclass(frozen=True)
class CaptionForms:
    """How a caption becomes the texts of ITC, ITM and ITG; the defaults are InternVL's.

    Args:
        itc_prefix: before the caption of the contrastive text (``'summarize:' + caption``, no space:
            internvl_g/internvl/train/dataset.py:101; the zero-shot tokenizer's default prefix,
            clip_benchmark/.../internvl_huggingface/__init__.py:30).
        itg_prefix: the prompt of the generated caption (dataset.py:111), not supervised.
        normalize: apply InternVL's ``process_single_caption`` (dataset.py:57-67) to every caption.
        max_words: captions are cut to this many words when ``normalize`` (dataset.py:57, 65).
    """

    itc_prefix: str = "summarize:"
    itg_prefix: str = "English caption:"
    normalize: bool = True
    max_words: int = 50


def normalize_caption(caption: str, max_words: int = 50) -> str:
    """InternVL's ``process_single_caption`` (internvl_g/internvl/train/dataset.py:57-67): lower-case, each
    of ``. ! " ( ) * # : ; ~`` → a space, runs of two or more whitespace characters → one space, stripped
    of spaces, then cut to ``max_words`` space-separated words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _ends(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids around every text: the BOS a tokenizer adds on its own (InternVL's LlamaTokenizer does;
    ``HFTokenizer.bos_id``, none for the byte tokenizer) and the end token (``add_eos_token=True``:
    internvl_g/internvl/train/internvl_stage2_finetune.py:188, clip_benchmark/.../__init__.py:28)."""
    bos = getattr(tokenizer, "bos_id", None)
    return ([] if bos is None else [bos]), [tokenizer.eos_id]


def itc_ids(
    text: str, tokenizer: Tokenizer, forms: CaptionForms = CaptionForms(), normalize: bool = False
) -> list[int]:
    """The contrastive form of ``text``: ``[bos] + ids(itc_prefix + text) + [end]``. Zero-shot prompts are
    not normalised (the default); captions are (``normalize=forms.normalize``)."""
    if normalize:
        text = normalize_caption(text, forms.max_words)
    start, end = _ends(tokenizer)
    return start + tokenizer.encode(forms.itc_prefix + text) + end


def itm_ids(caption: str, tokenizer: Tokenizer, forms: CaptionForms = CaptionForms()) -> list[int]:
    """The matching form of a caption: ``[bos] + ids(caption) + [end]`` (dataset.py:80, 89)."""
    if forms.normalize:
        caption = normalize_caption(caption, forms.max_words)
    start, end = _ends(tokenizer)
    return start + tokenizer.encode(caption) + end


def caption_sample(caption: str, tokenizer: Tokenizer, forms: CaptionForms = CaptionForms()) -> dict[str, list[int]]:
    """The ITC, ITM and ITG forms of one caption: ``{"input_ids", "itm_ids", "itg_ids", "itg_labels"}``.

    ITG (dataset.py:110-132) is the prefix's ids (with the BOS, without an end) followed by the caption's
    ids and the end token, tokenised apart as the reference does. ``itg_labels`` are the ids themselves
    (the model shifts) with the prefix ignored: the first caption token is the first one supervised.
    The reference masks ``labels[:, :prefix_len - 1]``, which also supervises the prefix's last token (the
    ``:`` predicted from the prefix); here the prompt is never a target.

    Raises ValueError when the caption is empty (after normalisation).
    """
    text = normalize_caption(caption, forms.max_words) if forms.normalize else caption
    if not text.strip():
        raise ValueError(f"caption {caption!r} is empty after normalisation")
    start, end = _ends(tokenizer)
    prefix = start + tokenizer.encode(forms.itg_prefix)
    content = tokenizer.encode(text) + end
    return {
        "input_ids": start + tokenizer.encode(forms.itc_prefix + text) + end,
        "itm_ids": start + tokenizer.encode(text) + end,
        "itg_ids": prefix + content,
        "itg_labels": [IGNORE_INDEX] * len(prefix) + content,
    }


def usable(caption, forms: CaptionForms) -> bool:
    """Whether a caption has text left after (optional) normalisation."""
    if not isinstance(caption, str):
        return False
    return bool((normalize_caption(caption, forms.max_words) if forms.normalize else caption).strip())


def pair_sample(
    pixel_values: torch.Tensor,
    caption: str,
    negative: str | None,
    tokenizer: Tokenizer,
    forms: CaptionForms,
    label: int,
    caption_key: int,
    image_id: int,
    name: str,
) -> dict:
    """One pair sample (the module docstring's layout), from an image tensor and its caption, and the ``negative``
    caption when the stage reads one (None: no ``negative_ids``)."""
    texts = {key: torch.tensor(ids) for key, ids in caption_sample(caption, tokenizer, forms).items()}
    if negative is not None:
        texts["negative_ids"] = torch.tensor(itm_ids(negative, tokenizer, forms))
    return {
        "pixel_values": pixel_values,
        **texts,
        "label": label,
        "caption_key": caption_key,
        "image_id": image_id,
        "name": name,
    }


# -- images -------------------------------------------------------------------------------------


def random_resized_crop(
    image: Image.Image, size: int, rng: random.Random, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """torchvision's ``RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=BICUBIC)`` of InternVL's
    training transform (internvl_g/internvl/train/dataset.py:18), with its parameter draw (ten tries of
    an area fraction in ``scale`` and a log-uniform aspect in ``ratio``, else a centre crop of the clamped
    aspect), drawn from ``rng``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def pair_image(image: Image.Image, size: int, rng: random.Random | None = None) -> torch.Tensor:
    """An image → one normalised ``(3, size, size)`` tile. With ``rng`` (training), InternVL's
    augmentation: random resized crop and a horizontal flip half of the time (dataset.py:16-23); without,
    a bicubic resize to ``size × size``, as InternVL's retrieval evaluation (clip_benchmark/.../__init__.py:43)."""
    image = image.convert("RGB")
    if rng is None:
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        return to_tensor(image)
    image = random_resized_crop(image, size, rng)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(image)


# -- records ------------------------------------------------------------------------------------


def record_captions(record: Record) -> list[str]:
    """A pair record's captions: ``[text]``, or its ``texts``."""
    fields = record.fields
    return [fields["text"]] if "text" in fields else list(fields["texts"])


def record_label(record: Record) -> int:
    """The record's class label, -1 when it has none; a label that is not an int is a bad record."""
    label = record.fields.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int):
        raise BadRecord(record.name, "malformed record", f"'label' must be an integer, got {label!r}")
    return label


def image_key(data: bytes) -> int:
    """A non-negative 63-bit id of an encoded image (its content): equal files get equal ids."""
    return int.from_bytes(hashlib.blake2b(bytes(data), digest_size=8).digest(), "little") & (2**63 - 1)


class PairBuilder:
    """Pair records → pair samples, at ``tile_size`` (augmented with ``augment``, seeded by
    ``(seed, index)`` so a resumed run repeats its crops); bad records raise or, with :meth:`safe`, are
    skipped and counted by the collator."""

    def __init__(
        self, tokenizer: Tokenizer, forms: CaptionForms, tile_size: int, augment: bool = False, seed: int = 0,
        strict: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS, negative: bool = False,
    ) -> None:  # fmt: skip
        self.tokenizer, self.forms, self.tile_size, self.negative = tokenizer, forms, tile_size, negative
        self.augment, self.seed, self.strict, self.max_pixels = augment, seed, strict, max_pixels

    def safe(self, make: Callable[[], dict]) -> dict:
        """``make()``, with a bad record logged and returned as ``{"skipped": reason, "name"}``."""
        try:
            return make()
        except BadRecord as error:
            if self.strict:
                raise
            log.warning("skipping %s", error)
            return {"skipped": error.reason, "name": error.name}

    def __call__(
        self, record: Record, caption: int, negative: str | None, caption_key: int, image_id: int, index: int
    ) -> dict:
        """Sample of ``record``'s caption number ``caption`` with the ``negative`` caption (an ITM text; None when
        the stage reads none)."""
        text = record_captions(record)[caption]
        if not usable(text, self.forms):
            raise BadRecord(record.name, "empty caption", f"caption {caption} {text!r} has no words")
        label = record_label(record)
        images = open_images(record, max_pixels=self.max_pixels)
        if len(images) != 1:
            raise BadRecord(record.name, "malformed record", f"a pair has one image, this one {len(images)}")
        rng = random.Random(f"{self.seed}/augment/{index}") if self.augment else None
        pixels = pair_image(images[0], self.tile_size, rng)
        name = record.name if len(record_captions(record)) == 1 else f"{record.name}#{caption}"
        return pair_sample(pixels, text, negative, self.tokenizer, self.forms, label, caption_key, image_id, name)


def _required(negative: str | None, record: Record) -> str:
    """The negative caption the stage asked for; none found is a bad record."""
    if negative is None:
        raise BadRecord(record.name, "no negative caption", f"no other image's caption in {NEGATIVE_DRAWS} draws")
    return negative


def draw_negative(index: int, count: int, seed: int, fits: Callable[[int], str | None]) -> str | None:
    """InternVL's negative (dataset.py:137-140): sample indices ``j`` uniform over ``[0, count)``, seeded
    by ``(seed, index)``, until ``fits(j)`` gives a caption (None: the same image, or no usable caption);
    None after :data:`NEGATIVE_DRAWS` draws."""
    rng = random.Random(f"{seed}/negative/{index}")
    for _ in range(NEGATIVE_DRAWS):
        caption = fits(rng.randrange(count))
        if caption is not None:
            return caption
    return None


class JsonlPairs(Dataset):
    """Pair samples of jsonl files (or a meta file's datasets, ``repeat_time`` applied): one per caption.

    Captions of one image, and records that repeat an image path, share one group id, which is both
    ``caption_key`` and ``image_id``. Indexing reads every line once more than :class:`JsonlSamples` does
    (for the image paths and caption counts); only compact per-sample arrays stay in memory. Records that
    are not pairs are skipped when indexed (counted in :attr:`skips`, or raised with ``strict``).
    """

    def __init__(self, specs, builder: PairBuilder) -> None:
        self.builder = builder
        self.skips = SkipCounter()
        self.items: list[tuple] = []
        groups: dict[str, int] = {}
        item_of, caption_of, group_of = [], [], []
        for spec in specs:
            for item in index_records(spec, builder.strict, self.skips):
                record = read_record(item)
                if record.kind != "pair" or len(record.images) != 1:
                    error = BadRecord(
                        record.name, "not a pair", f"a {record.kind} record with {len(record.images)} image(s)"
                    )
                    if builder.strict:
                        raise error
                    self.skips.skip(error)
                    continue
                group = groups.setdefault(str(Path(record.images[0]).resolve()), len(groups))
                for caption in range(len(record_captions(record))):
                    item_of.append(len(self.items))
                    caption_of.append(caption)
                    group_of.append(group)
                self.items.append(item)
        if len(groups) < 2:
            sources = [str(spec.annotation) for spec in specs]
            raise ValueError(
                f"{sources}: pairs need records of at least two images (a contrastive batch and ITM's negatives match "
                f"captions to other images), found {len(groups)} ({self.skips.total} record(s) skipped; a "
                "vision-language stage reads conversations)"
            )
        self.item_of, self.caption_of = np.asarray(item_of, np.int64), np.asarray(caption_of, np.int32)
        self.group_of = np.asarray(group_of, np.int64)

    def __len__(self) -> int:
        return len(self.item_of)

    def _record(self, index: int) -> Record:
        return read_record(self.items[int(self.item_of[index])])

    def _caption(self, index: int) -> str | None:
        try:
            caption = record_captions(self._record(index))[int(self.caption_of[index])]
        except (BadRecord, IndexError, KeyError):  # the file changed since it was indexed
            return None
        return caption if usable(caption, self.builder.forms) else None

    def negative(self, index: int) -> str | None:
        """The ITM negative of sample ``index``: a caption of another image (None: none found)."""
        group = self.group_of[index]
        return draw_negative(
            index, len(self), self.builder.seed, lambda j: None if self.group_of[j] == group else self._caption(j)
        )

    def _sample(self, index: int) -> dict:
        record = self._record(index)
        negative = _required(self.negative(index), record) if self.builder.negative else None
        group = int(self.group_of[index])
        return self.builder(record, int(self.caption_of[index]), negative, group, group, index)

    def __getitem__(self, index: int) -> dict:
        return self.builder.safe(lambda: self._sample(index))


class StreamingPairs(StreamingDataset):
    """Pair samples of litdata shards written by ``python -m lit_internvl prepare`` (one item per caption,
    :func:`split_captions`). The group id of an item is the hash of its image's bytes (:func:`image_key`),
    so repeated images share a key; the negative reads other items by index (a random read into any
    chunk: with shards in object storage each one may fetch a chunk)."""

    def __init__(
        self, input_dir: str, builder: PairBuilder, shuffle: bool = False, seed: int = 0,
        storage_options: dict | None = None, drop_last: bool | None = None,
    ) -> None:  # fmt: skip
        if not input_dir.startswith(REMOTE_PREFIXES):
            check_chunks(input_dir)
        super().__init__(
            input_dir, shuffle=shuffle, seed=seed, storage_options=storage_options or {}, drop_last=drop_last
        )
        self.builder = builder

    def _item(self, index: int) -> tuple[Record, int]:
        record = decode_shard_item(self, index, super().__getitem__(index))
        return record, image_key(record.images[0]) if len(record.images) == 1 else -1

    def negative(self, index: int, group: int) -> str | None:
        def fits(j: int) -> str | None:
            record, other = self._item(j)
            if other == group or record.kind != "pair":
                return None
            caption = record_captions(record)[0]
            return caption if usable(caption, self.builder.forms) else None

        return draw_negative(index, len(self.cache), self.builder.seed, fits)

    def _sample(self, index) -> dict:
        record = decode_shard_item(self, index, super().__getitem__(index))
        position = int(getattr(index, "index", index))  # litdata hands its loader ChunkedIndex items
        if record.kind != "pair" or len(record.images) != 1:
            raise BadRecord(record.name, "not a pair", f"a {record.kind} record with {len(record.images)} image(s)")
        group = image_key(record.images[0])
        negative = _required(self.negative(position, group), record) if self.builder.negative else None
        return self.builder(record, 0, negative, group, group, position)

    def __getitem__(self, index) -> dict:
        return self.builder.safe(lambda: self._sample(index))


def split_captions(encoded: dict):
    """A prepared item → one item per caption: a pair record ``{"image", "texts": [...]}`` becomes
    ``{"image", "text"}`` records named ``file:line#k`` (each stores the image again, as a jsonl file that
    repeats the image path per caption does); every other item passes unchanged."""
    meta = json.loads(encoded["record"])
    fields = meta["fields"]
    if meta["kind"] != "pair" or "text" in fields or "texts" not in fields:
        yield encoded
        return
    rest = {key: value for key, value in fields.items() if key != "texts"}
    for k, caption in enumerate(fields["texts"]):
        one = {**meta, "name": f"{meta['name']}#{k}", "fields": {**rest, "text": caption}}
        yield {"record": json.dumps(one), "images": encoded["images"]}


def read_class_names(names: str | list[str] | None) -> list[str] | None:
    """Class names for zero-shot evaluation: a list, or a file of one name a line (label = line number,
    from 0; blank lines are an error, as they would shift the labels)."""
    if names is None or isinstance(names, list):
        return names
    lines = Path(names).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"{names}: class-name line(s) {blank} are blank; a label is the line number of its name")
    return [line.strip() for line in lines]
