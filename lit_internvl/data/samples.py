"""Records → training samples: images tiled, text templated and tokenized, labels masked.

:class:`SampleBuilder`, set by one :class:`SampleOptions` and the stage's views
(:mod:`lit_internvl.data.views`), is the one function from a :class:`~lit_internvl.data.records.Record` to
``{"views": {view name: sample}, "name"}``, a sample being
``{"input_ids" (L,), "labels" (L,), "pixel_values" (tiles, 3, S, S) | None, "budget", "name", "meta"}``:

- conversation: the chat template's masks (only the assistant's answers are trained);
- pair: a conversation whose question is the image and whose answer is the caption;
- interleaved: the document's text is trained, its image spans are not;
- text: every token (plus the end token) is trained;
- preference: the question answered with ``chosen`` (the ``conversation`` and ``chosen`` views) or with
  ``rejected`` (the ``rejected`` view), for preference optimisation;
- steps: the critic's conversation, one ``+``/``-`` answer per step trained (:mod:`lit_internvl.data.critic`).

With ``v2pe`` on, a sample also carries its float32 ``positions`` (:mod:`lit_internvl.data.v2pe`); without,
the collator numbers each sample's tokens ``0..L−1``. With ``split_long``, an interleaved or text record longer
than ``max_length`` becomes ``{"parts": [{"views": ...}, ...], "dropped": n}``: parts cut between images, each
keeping its slice of the document's positions (:func:`split_points`). The ``prompt`` view leaves the last answer
out (kept as ``reference``) and ends with the assistant header.

Every ``<image>`` reserves ``budget × tiles`` ``<IMG_CONTEXT>`` slots, the number the model's connector gives
for those tiles at the view's budget. A record that cannot become a sample raises
:class:`~lit_internvl.data.records.BadRecord`; :meth:`SampleBuilder.safe` turns that into a
``{"skipped": reason}`` entry that the collator counts (or re-raises with ``strict``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass

import lightning as L
import torch

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.contract import Tokenizer
from lit_internvl.data.critic import PRM_SYSTEM_PROMPT, critic_turns, tokenize_critic
from lit_internvl.data.images import DEFAULT_MAX_PIXELS
from lit_internvl.data.records import IMAGE_PLACEHOLDER, BadRecord, Record, check_something_to_train, open_images
from lit_internvl.data.templates import (
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
from lit_internvl.data.views import (
    RECORD_VIEWS,
    VIEW_KINDS,
    VISION_LANGUAGE,
    View,
    ViewError,
    check_offered,
    describe,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleOptions:
    """How records become samples: the tiling and template settings that both datamodules and
    :class:`SampleBuilder` share.

    Args:
        template: a registered chat template's name, or a custom :class:`~lit_internvl.data.templates.ChatTemplate`.
        tile_size, min_tiles, max_tiles, use_thumbnail: dynamic tiling; a record's dataset's
            ``max_dynamic_patch`` replaces ``max_tiles`` (lower or higher), as in InternVL.
        max_length: longer samples are bad records ("over-long sample"), never truncated silently.
        system: system message instead of the template's default (a record's own system turn wins over both).
        thinking: thinking mode (InternVL3.5): the template's reasoning system message unless ``system`` is set,
            and GPT-OSS answers' ``<think>…</think>`` on the analysis channel
            (:func:`~lit_internvl.data.templates.conversation_segments`).
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

    template: TemplateName | ChatTemplate = "internvl2_5"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_length: int = 4096
    system: str | None = None
    thinking: bool = False
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


def _text_bytes(value) -> int:
    """UTF-8 bytes of every string in a record's fields (nested lists and dicts)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


class SampleBuilder:
    """Turns records into samples for a vision-language model, one sample per view of the record.

    Args:
        tokenizer: :class:`~lit_internvl.data.tokenizer.ByteTokenizer` or ``HFTokenizer``.
        options: tiling, template and length settings.
        views: the vision-language views to build (:mod:`lit_internvl.data.views`), each with its budget set.
        image_root: folder that records' relative image paths start from.

    A record becomes ``{"views": {view name: sample}, "name"}``; the images are tiled once and shared by every
    view, each view reserving ``budget × tiles`` ``<IMG_CONTEXT>`` slots per image.
    """

    def __init__(
        self, tokenizer: Tokenizer, options: SampleOptions, views: tuple[View, ...], image_root: str | None = None
    ) -> None:
        unset = [view.name for view in views if view.budget is None]
        if unset or not views:
            raise ValueError(f"SampleBuilder needs views with a budget set (unset: {unset or 'no views'})")
        self.tokenizer, self.options, self.views, self.image_root = tokenizer, options, tuple(views), image_root
        self.prompt_only = all(view.kind == "prompt" for view in views)

    def max_text_bytes(self, kind: str | None = None) -> int | None:
        """More text than this (UTF-8 bytes of a record's strings, ``meta`` aside) cannot fit ``max_length`` tokens
        in the longest of the views (no token stands for more than the tokenizer's longest entry, and every string
        is in some view): such a record is over-long before it is tokenized. None where a record may be longer: a
        prompt view leaves its answer out, ``split_long`` splits interleaved and text records (``kind``)."""
        o = self.options
        if any(view.kind == "prompt" for view in self.views):
            return None
        if o.split_long and (kind is None or kind in ("interleaved", "text")):
            return None
        return o.max_length * self.tokenizer.longest_token_bytes * len(self.views)

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
        if not self.prompt_only:  # records made in memory were never scanned
            check_something_to_train(record)
        limit = self.max_text_bytes(record.kind)
        text = _text_bytes({k: v for k, v in record.fields.items() if k != "meta"}) if limit is not None else 0
        if limit is not None and text > limit:  # a 200 MB line would cost gigabytes to tokenize before its check
            raise BadRecord(
                record.name, "over-long sample",
                f"{text} bytes of text cannot fit max_length {o.max_length} tokens (not tokenized)",
            )  # fmt: skip
        missing = [view.kind for view in self.views if view.kind not in RECORD_VIEWS[record.kind]]
        if missing:  # the stage and the data disagree: every such record would be skipped, so nothing would train
            raise ViewError(
                f"{record.name} is a {record.kind} record: it has no {', '.join(missing)} view, and the stage trains on "
                f"{describe(self.views)} (a {record.kind} record gives {', '.join(sorted(RECORD_VIEWS[record.kind]))})"
            )
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
        context_id = self.tokenizer.token_to_id(IMG_CONTEXT)
        built = {}
        for view in self.views:
            counts = [tiles * view.budget for tiles in tiles_per_image]
            try:
                ids, labels, extra = self._tokens(record, view.kind, counts, len(images))
            except PlaceholderMismatchError as error:
                raise BadRecord(record.name, "placeholder mismatch", str(error)) from None
            # One rng a sequence, seeded by the record: the same strides in every worker, epoch and resumed run,
            # and every view of a record (a preference pair's two answers) sees its images at the same positions.
            built[view.name] = (view, ids, labels, extra, self.positions(ids, context_id, record.name))
        longest = max(len(ids) for _, ids, *_ in built.values())
        splittable = len(self.views) == 1 and self.views[0].kind == "conversation"
        if longest > o.max_length and o.split_long and record.kind in ("interleaved", "text") and splittable:
            view, ids, labels, _, positions = built[self.views[0].name]
            return self._split(record.name, view, ids, labels, positions, pixel_values, tiles_per_image, context_id)
        if longest > o.max_length:
            raise BadRecord(record.name, "over-long sample", f"{longest} tokens > max_length {o.max_length}")
        samples = {}
        for name, (view, ids, labels, extra, positions) in built.items():
            if view.kind != "prompt" and all(label == IGNORE_INDEX for label in labels):
                raise BadRecord(record.name, "nothing to train", "no token of the sample is supervised")
            samples[name] = {
                "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": pixel_values if tiles_per_image else None, "budget": view.budget,
                "name": record.name, "meta": record.fields.get("meta"), "positions": positions, **extra,
            }  # fmt: skip
        return {"views": samples, "name": record.name}

    def _tokens(self, record: Record, kind: str, counts: list[int], images: int) -> tuple[list[int], list[int], dict]:
        """``(ids, labels, extra)`` of ``record`` seen as ``kind`` (``extra``: a prompt's ``reference``)."""
        fields, prompt = record.fields, kind == "prompt"
        if record.kind == "preference":
            if kind == "rejected":
                return (*self._answered(fields["question"], fields["rejected"], counts), {})
            if prompt:
                return (*self._answered(fields["question"], None, counts), {"reference": fields["chosen"]})
            return (*self._answered(fields["question"], fields["chosen"], counts), {})
        if record.kind in ("conversation", "pair"):
            if record.kind == "pair":
                o = self.options
                question = IMAGE_PLACEHOLDER + (f"\n{o.pair_prompt}" if o.pair_prompt else "")
                caption = fields["text"] if "text" in fields else fields["texts"][0]  # several: the first
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]
            else:
                turns = fields["conversations"]
                if record.is_video:
                    turns = expand_video_placeholder(turns, images)
            extra = {}
            if prompt:
                extra["reference"] = turns[-1]["value"] if turns[-1]["from"] == "gpt" else None
                turns = turns[:-1] if turns[-1]["from"] == "gpt" else turns
            o = self.options
            ids, labels = tokenize_conversation(
                turns, self.tokenizer, o.template, counts, o.system, add_generation_prompt=prompt, thinking=o.thinking
            )
            return ids, labels, extra
        if record.kind == "interleaved":
            return (*self._interleaved(fields["texts"], counts), {})
        if record.kind == "text":
            ids = self.tokenizer.encode(fields["text"]) + [self.tokenizer.eos_id]
            return ids, list(ids), {}
        ids, labels, meta = self._steps(record, counts)
        return ids, labels, {"meta": meta}

    def positions(self, ids: list[int], context_id: int, name: str) -> torch.Tensor | None:
        """The V2PE positions of one sequence (None when ``v2pe`` is off)."""
        o = self.options
        return sample_positions(ids, context_id, o.v2pe, random.Random(f"{o.seed}/v2pe/{name}"))

    def _split(self, name, view, ids, labels, positions, pixel_values, tiles_per_image, context_id) -> dict:
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
                "budget": view.budget,
                "name": f"{name}#{k}",
                "meta": None,
            }
            parts.append({"views": {view.name: part}, "name": part["name"]})
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

    def _answered(self, question: str, answer: str | None, counts: list[int]) -> tuple[list[int], list[int]]:
        """The question answered with ``answer``; None: the question as a prompt to answer."""
        if IMAGE_PLACEHOLDER not in question and counts:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        turns = [{"from": "human", "value": question}]
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
        return tokenize_conversation(
            turns, self.tokenizer, self.options.template, counts, self.options.system,
            add_generation_prompt=answer is None, thinking=self.options.thinking,
        )  # fmt: skip

    def _steps(self, record: Record, counts: list[int]) -> tuple[list[int], list[int], dict]:
        """The critic's conversation (:mod:`lit_internvl.data.critic`), VisualPRM's system prompt unless ``system``
        is set; ``meta`` gains the step labels and the ``group`` (image and question) a ranking compares within."""
        fields = record.fields
        turns = critic_turns(fields["question"], fields["steps"], fields["labels"], len(counts))
        system = PRM_SYSTEM_PROMPT if self.options.system is None else self.options.system
        ids, labels = tokenize_critic(turns, self.tokenizer, self.options.template, counts, system)
        meta = dict(fields.get("meta") or {})
        meta.setdefault("group", f"{[_identity(image) for image in record.images]}|{fields['question']}")
        return ids, labels, {**meta, "labels": list(fields["labels"])}

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


def _identity(image) -> str:
    """What tells one image of a record from another: its path, or a digest of its encoded bytes (shards)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(image), digest_size=8).hexdigest()
    return str(image) if isinstance(image, str) else str(id(image))


class SampleDataModule(L.LightningDataModule):
    """A source of records whose samples a :class:`SampleBuilder` makes with ``self.sample_options``
    (``self.eval_options`` for held-out splits): the tile facts the model–data handshake reads
    (:class:`~lit_internvl.data.contract.StageData`) come from those options, and the views come from the stage.

    In the handshake the stage asks for its views (:meth:`use_views`); a view the records cannot give fails there,
    naming the stage and :attr:`source` (YAML key and value). Loaders build exactly those views, nothing else.
    """

    sample_options: SampleOptions
    eval_options: SampleOptions
    #: Whether training rows are packed (a datamodule with a ``pack`` option sets it).
    pack: bool = False
    requested: tuple[View, ...] | None = None

    @property
    def tile_size(self) -> int:
        return self.sample_options.tile_size

    @property
    def source(self) -> str:
        """What a view error names: the data's class and the YAML key that says what its records are."""
        return f"data {type(self).__name__}"

    def offered_views(self) -> frozenset[str]:
        """The view kinds these records can give (:mod:`lit_internvl.data.views`)."""
        return frozenset(VIEW_KINDS)

    def use_views(self, views: tuple[View, ...], stage: str = "the stage") -> None:
        """Give the loaders' batches these ``views`` (budgets set); a :class:`~lit_internvl.data.views.ViewError`
        naming ``stage`` and :attr:`source` when the records cannot give one of them."""
        views = tuple(views)
        check_offered(views, self.offered_views(), stage, self.source)
        kinds = {view.kind for view in views}
        if kinds & {"pair", "negative"} and kinds & VISION_LANGUAGE:
            raise ViewError(f"{stage} asks for {describe(views)}: pair views and conversation views do not mix")
        if self.pack and [view.kind for view in views] != ["conversation"]:
            raise ViewError(
                f"data.init_args.pack is true, but {stage} trains on {describe(views)}: only a single conversation "
                "view is packed; set pack: false"
            )
        self.requested = views

    @property
    def views(self) -> tuple[View, ...]:
        """The views the stage asked for (:meth:`use_views`)."""
        if self.requested is None:
            raise ViewError(
                f"{type(self).__name__} has not been asked for any view: a stage asks in its handshake, or call "
                "datamodule.use_views(views) yourself"
            )
        return self.requested

    def prompt_views(self) -> tuple[View, ...]:
        """``predict``'s view: the prompt, at the budget of the stage's first vision-language view."""
        budget = next((view.budget for view in self.views if view.kind in VISION_LANGUAGE), None)
        return (View("prompt", budget),)

    def sample_builder(self, train: bool = False, views: tuple[View, ...] | None = None) -> SampleBuilder:
        """How records become samples of ``views`` (default the stage's vision-language views); only training
        samples are augmented."""
        views = tuple(view for view in (views or self.views) if view.kind in VISION_LANGUAGE)
        return SampleBuilder(self.tokenizer, self.sample_options if train else self.eval_options, views)
