"""Records → training samples: images tiled, text templated and tokenized, labels masked.

:class:`SampleBuilder`, set by one :class:`SampleOptions`, is the one function from a
:class:`~lit_internvl.data.records.Record` to a sample
``{"input_ids" (L,), "labels" (L,), "pixel_values" (tiles, 3, S, S) | None, "name"}``:

- conversation: the chat template's masks (only the assistant's answers are trained);
- pair: a conversation whose question is the image and whose answer is the caption;
- interleaved: the document's text is trained, its image spans are not;
- text: every token (plus the end token) is trained;
- preference: the question answered with ``chosen`` is the sample; ``rejected`` holds the same
  question answered with the rejected response (for preference optimisation).

With ``v2pe`` on, a sample also carries its float32 ``positions`` (:mod:`lit_internvl.data.v2pe`); without,
the collator numbers each sample's tokens ``0..L−1``. With ``split_long``, an interleaved or text record longer
than ``max_length`` becomes ``{"parts": [sample, ...], "dropped": n}``: parts cut between images, each keeping
its slice of the document's positions (:func:`split_points`).

Every ``<image>`` reserves ``tokens_per_tile × tiles`` ``<IMG_CONTEXT>`` slots, the number the
model's connector gives for those tiles. A record that cannot become a sample raises
:class:`~lit_internvl.data.records.BadRecord`; :meth:`SampleBuilder.safe` turns that into a
``{"skipped": reason}`` entry that the collator counts (or re-raises with ``strict``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import lightning as L
import torch

from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.images import DEFAULT_MAX_PIXELS
from lit_internvl.data.records import IMAGE_PLACEHOLDER, BadRecord, Record, check_something_to_train, open_images
from lit_internvl.data.templates import (
    IGNORE_INDEX,
    ChatTemplate,
    PlaceholderMismatchError,
    TemplateName,
    expand_video_placeholder,
    image_tokens,
    tokenize_conversation,
)
from lit_internvl.data.tiling import INTERNVL_JPEG_QUALITY, tile_sample
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.data.v2pe import V2PEMode, check_v2pe, image_runs, sample_positions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleOptions:
    """How records become samples: the tiling and template settings that both datamodules and
    :class:`SampleBuilder` share.

    Args:
        tokens_per_tile: ``<IMG_CONTEXT>`` tokens per tile (the model's ``tokens_per_tile`` at ``tile_size``).
        template: a registered chat template's name, or a custom :class:`~lit_internvl.data.templates.ChatTemplate`.
        tile_size, min_tiles, max_tiles, use_thumbnail: dynamic tiling; a record's dataset's
            ``max_dynamic_patch`` replaces ``max_tiles`` (lower or higher), as in InternVL.
        max_length: longer samples are bad records ("over-long sample"), never truncated silently.
        system: system message instead of the template's default.
        pair_prompt: the question of a pair record (empty: the image alone).
        jpeg_quality: JPEG re-encode augmentation range, e.g. ``(75, 100)``; None is off. A record's
            dataset's ``data_augment`` overrides it: false turns it off, true on (with
            :data:`~lit_internvl.data.tiling.INTERNVL_JPEG_QUALITY` when ``jpeg_quality`` is None).
        augment: False turns augmentation off whatever the datasets say (evaluation samples).
        max_image_pixels: images of more pixels are bad records ("image too large"), checked on the
            file's header before decoding; the default is PIL's decompression-bomb threshold; None: no limit.
        strict: raise on a bad record instead of skipping it.
        seed: seeds the augmentation and V2PE's strides, per record.
        v2pe: ``"off"`` (positions ``0..L−1``), ``"random"`` (a stride S drawn per image, seeded per record) or
            ``{"stride": S}``: :mod:`lit_internvl.data.v2pe`.
        split_long: an interleaved or text record longer than ``max_length`` is split between images
            into parts of at most ``max_length`` tokens (NMP), not skipped as "over-long sample".
    """

    tokens_per_tile: int
    template: TemplateName | ChatTemplate = "internvl2_5"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_length: int = 4096
    system: str | None = None
    pair_prompt: str = ""
    jpeg_quality: tuple[int, int] | None = None
    augment: bool = True
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    strict: bool = False
    seed: int = 0
    v2pe: V2PEMode = "off"
    split_long: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "v2pe", check_v2pe(self.v2pe, "v2pe"))


class SampleBuilder:
    """Turns records into samples for a vision-language model.

    Args:
        tokenizer: :class:`~lit_internvl.data.tokenizer.ByteTokenizer` or ``HFTokenizer``.
        options: tiling, template and length settings.
        generation: build prompts to answer: a conversation's last answer is left out (kept as
            ``reference``) and the assistant header ends the prompt.
        image_root: folder that records' relative image paths start from.
    """

    def __init__(
        self, tokenizer: Tokenizer, options: SampleOptions, generation: bool = False, image_root: str | None = None
    ) -> None:
        self.tokenizer, self.options, self.generation, self.image_root = tokenizer, options, generation, image_root

    def safe(self, record: Record | BadRecord) -> dict:
        """:meth:`__call__`, with a bad record logged and returned as ``{"skipped": reason, "name"}``."""
        try:
            if isinstance(record, BadRecord):
                raise record
            return self(record)
        except BadRecord as error:
            if self.options.strict:
                raise
            log.warning("skipping %s", error)
            return {"skipped": error.reason, "name": error.name}

    def __call__(self, record: Record) -> dict:
        o = self.options
        if not self.generation:  # records made in memory were never scanned
            check_something_to_train(record)
        images = open_images(record, self.image_root, o.max_image_pixels)
        # InternVL: a meta file's max_dynamic_patch replaces the global max_num, even upwards
        # (internvl_chat_finetune.py, build_datasets, lines 722-726).
        max_tiles = record.max_tiles if record.max_tiles is not None else o.max_tiles
        jpeg_quality = self.jpeg_quality(record)
        pixel_values, tiles_per_image = tile_sample(
            images, o.tile_size, max_tiles, is_video=record.is_video, min_tiles=o.min_tiles,
            use_thumbnail=o.use_thumbnail, jpeg_quality=jpeg_quality,
            # Seeded per record, so the augmentation does not depend on which worker builds it.
            rng=random.Random(f"{o.seed}/{record.name}") if jpeg_quality else None,
        )  # fmt: skip
        counts = [tiles * o.tokens_per_tile for tiles in tiles_per_image]
        fields = record.fields
        extra: dict = {}
        try:
            if record.kind in ("conversation", "pair"):
                if record.kind == "pair":
                    question = IMAGE_PLACEHOLDER + (f"\n{o.pair_prompt}" if o.pair_prompt else "")
                    caption = fields["text"] if "text" in fields else fields["texts"][0]  # several: the first
                    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]
                else:
                    turns = fields["conversations"]
                    if record.is_video:
                        turns = expand_video_placeholder(turns, len(images))
                if self.generation:
                    extra["reference"] = turns[-1]["value"] if turns[-1]["from"] == "gpt" else None
                    turns = turns[:-1] if turns[-1]["from"] == "gpt" else turns
                ids, labels = tokenize_conversation(
                    turns, self.tokenizer, o.template, counts, o.system, add_generation_prompt=self.generation
                )
            elif record.kind == "interleaved":
                ids, labels = self._interleaved(fields["texts"], counts)
            elif record.kind == "text":
                ids = self.tokenizer.encode(fields["text"]) + [self.tokenizer.eos_id]
                labels = list(ids)
            else:
                ids, labels = self._answered(fields["question"], fields["chosen"], counts)
                rejected_ids, rejected_labels = self._answered(fields["question"], fields["rejected"], counts)
                extra = {"rejected": {"input_ids": torch.tensor(rejected_ids), "labels": torch.tensor(rejected_labels)}}
        except PlaceholderMismatchError as error:
            raise BadRecord(record.name, "placeholder mismatch", str(error)) from None
        context_id = self.tokenizer.token_to_id(IMG_CONTEXT)
        # One rng a sequence, seeded by the record: the same strides in every worker, epoch and resumed run,
        # and a preference pair's two answers see their images at the same positions.
        positions = self.positions(ids, context_id, record.name)
        if "rejected" in extra and positions is not None:
            extra["rejected"]["positions"] = self.positions(
                extra["rejected"]["input_ids"].tolist(), context_id, record.name
            )
        longest = max(len(ids), len(extra["rejected"]["input_ids"]) if "rejected" in extra else 0)
        if longest > o.max_length and o.split_long and record.kind in ("interleaved", "text") and not self.generation:
            return self._split(record.name, ids, labels, positions, pixel_values, tiles_per_image, context_id)
        if longest > o.max_length:
            raise BadRecord(record.name, "over-long sample", f"{longest} tokens > max_length {o.max_length}")
        if not self.generation and all(label == IGNORE_INDEX for label in labels):
            raise BadRecord(record.name, "nothing to train", "no token of the sample is supervised")
        sample = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values if tiles_per_image else None,
            "name": record.name,
            "meta": fields.get("meta"),
            **extra,
        }
        if positions is not None:
            sample["positions"] = positions
        return sample

    def positions(self, ids: list[int], context_id: int, name: str) -> torch.Tensor | None:
        """The V2PE positions of one sequence (None when ``v2pe`` is off)."""
        o = self.options
        return sample_positions(ids, context_id, o.v2pe, random.Random(f"{o.seed}/v2pe/{name}"))

    def _split(self, name, ids, labels, positions, pixel_values, tiles_per_image, context_id) -> dict:
        """An over-long document as parts of at most ``max_length`` tokens cut between images; a part with no
        trained target is dropped and counted (``"dropped"``)."""
        runs = image_runs(ids, context_id)
        try:
            cuts = split_points(len(ids), runs, self.options.max_length)
        except ValueError as error:
            raise BadRecord(name, "over-long sample", str(error)) from None
        if positions is None:
            positions = torch.arange(len(ids), dtype=torch.float32)
        first_tile = [sum(tiles_per_image[:i]) for i in range(len(tiles_per_image) + 1)]
        parts, dropped = [], 0
        for k, (start, end) in enumerate(zip(cuts[:-1], cuts[1:])):
            part_labels = labels[start:end]
            if all(label == IGNORE_INDEX for label in part_labels[1:]):  # the first label is no part's target
                dropped += 1
                continue
            images = [i for i, (lo, hi) in enumerate(runs) if start <= lo and hi <= end]
            part = {
                "input_ids": torch.tensor(ids[start:end]),
                "labels": torch.tensor(part_labels),
                "positions": positions[start:end].clone(),
                "pixel_values": pixel_values[first_tile[images[0]] : first_tile[images[-1] + 1]] if images else None,
                "name": f"{name}#{k}",
                "meta": None,
            }
            parts.append(part)
        if not parts:
            raise BadRecord(name, "nothing to train", "no part of the split document has a supervised token")
        if dropped:
            log.warning("%s: %d part(s) of the split document have nothing to train and are dropped", name, dropped)
        return {"parts": parts, "dropped": dropped, "name": name}

    def jpeg_quality(self, record: Record) -> tuple[int, int] | None:
        """The JPEG augmentation range for ``record``: its dataset's ``data_augment`` decides when set
        (InternVL builds each dataset's transform with ``is_train=data_augment``,
        internvl_chat_finetune.py line 734, and ``is_train`` adds the JPEG degradation,
        internvl/train/dataset.py lines 285-288), else the options' ``jpeg_quality``; never when not ``augment``."""
        o = self.options
        if not o.augment or record.augment is False:
            return None
        if record.augment:
            return o.jpeg_quality or INTERNVL_JPEG_QUALITY
        return o.jpeg_quality

    def _answered(self, question: str, answer: str, counts: list[int]) -> tuple[list[int], list[int]]:
        if IMAGE_PLACEHOLDER not in question and counts:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return tokenize_conversation(turns, self.tokenizer, self.options.template, counts, self.options.system)

    def _interleaved(self, texts: list[str], counts: list[int]) -> tuple[list[int], list[int]]:
        """Text pieces trained, image spans masked; ends with the (trained) end token."""
        pieces = " ".join(texts).split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(counts):
            raise PlaceholderMismatchError(len(pieces) - 1, len(counts))
        ids: list[int] = []
        labels: list[int] = []
        for i, piece in enumerate(pieces):
            piece_ids = self.tokenizer.encode(piece) if piece else []
            ids += piece_ids
            labels += piece_ids
            if i < len(counts):
                span = self.tokenizer.encode(image_tokens(counts[i]))
                ids += span
                labels += [IGNORE_INDEX] * len(span)
        ids.append(self.tokenizer.eos_id)
        labels.append(self.tokenizer.eos_id)
        return ids, labels


def split_points(length: int, runs: list[tuple[int, int]], max_length: int) -> list[int]:
    """Cut points ``[0, c1, …, length]`` of a document of ``length`` tokens into parts of at most ``max_length``,
    never inside an image span: ``<img>`` (just before a run of ``runs``) through ``</img>`` (just after it).

    As OpenGVLab's packed dataset (``internvl/train/dataset_packed.py``, ``split_buffer``, lines 253-337):
    a part ends at ``max_length`` tokens, or before the ``<img>`` of the image that straddles that point.
    Deliberate difference: the reference starts the next part at the next image, dropping the text between; here
    the next part starts at the cut, so no text is lost (a part may then begin with text or hold no image).
    """
    spans = [(start - 1, end + 1) for start, end in runs]  # <img> … </img>, end exclusive
    cuts = [0]
    while length - cuts[-1] > max_length:
        start, cut = cuts[-1], cuts[-1] + max_length
        for lo, hi in spans:
            if lo < cut < hi:  # the cut falls inside this image's span: cut before its <img>
                if lo <= start:
                    raise ValueError(f"an image span of {hi - lo} tokens does not fit max_length {max_length}")
                cut = lo
                break
        cuts.append(cut)
    cuts.append(length)
    return cuts


class SampleDataModule(L.LightningDataModule):
    """A datamodule whose samples a :class:`SampleBuilder` makes with ``self.sample_options``: the tile facts
    the model–data handshake reads (:class:`~lit_internvl.data.contract.StageData`) come from those options."""

    sample_options: SampleOptions

    @property
    def tile_size(self) -> int:
        return self.sample_options.tile_size

    @property
    def tokens_per_tile(self) -> int:
        return self.sample_options.tokens_per_tile
