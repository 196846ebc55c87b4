"""What the data hands a stage: typed batches, one per view of the samples, and their images with their budgets.

A loader yields :class:`Views`: each view the stage asked for (:mod:`lit_internvl.data.views`) collated into one
batch — a :class:`Batch` for the vision-language views, a :class:`PairBatch` or :class:`TextBatch` for the
dual-encoder ones, an :class:`ImageBatch` for the probes' — with the records skipped on the way. Labels hold :data:`IGNORE_INDEX` where nothing trains
(the losses read the same constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The label of a token that is not trained (prompts, images, padding), as PyTorch's cross-entropy default.
IGNORE_INDEX = -100


@dataclass
class Images:
    """The images of a batch: every tile, which row each belongs to, and how many tokens each becomes.

    Attributes:
        pixel_values: ``(tiles, 3, S, S)``, the tiles of row 0, then of row 1, …
        tiles_per_sample: tiles of each row (0 for a row without images); sums to ``tiles``.
        budgets: ``<IMG_CONTEXT>`` tokens each tile becomes (``tiles`` entries): a connector's budget, so that
            one batch may mix, say, 16- and 4-token tiles (:class:`~lit_internvl.models.VisionLanguageModel`).
        features: the vision encoder's output for the tiles ``(tiles, 1 + P, C)`` when it has already run (routing
            ran it to score the tiles: :mod:`lit_internvl.models.routing`), so that it does not run twice.
        routed: the router has picked these tiles' budgets (routing the images again changes nothing).
    """

    pixel_values: torch.Tensor
    tiles_per_sample: list[int]
    budgets: list[int]
    features: torch.Tensor | None = field(default=None, repr=False, compare=False)
    routed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        tiles = self.pixel_values.shape[0]
        if sum(self.tiles_per_sample) != tiles or len(self.budgets) != tiles:
            raise ValueError(
                f"Images: {tiles} tile(s), but tiles_per_sample {list(self.tiles_per_sample)} and "
                f"{len(self.budgets)} budget(s)"
            )

    @classmethod
    def uniform(cls, pixel_values: torch.Tensor, tiles_per_sample: list[int], budget: int) -> Images:
        """Every tile at the same ``budget``."""
        return cls(pixel_values, list(tiles_per_sample), [budget] * pixel_values.shape[0])

    def tokens_per_sample(self) -> list[int]:
        """``<IMG_CONTEXT>`` slots each row's images fill."""
        out, start = [], 0
        for tiles in self.tiles_per_sample:
            out.append(sum(self.budgets[start : start + tiles]))
            start += tiles
        return out

    def select(self, rows: list[int]) -> Images | None:
        """The images of ``rows``, in that order; None when they hold no tile."""
        starts = [0]
        for tiles in self.tiles_per_sample:
            starts.append(starts[-1] + tiles)
        tiles = [i for r in rows for i in range(starts[r], starts[r + 1])]
        if not tiles:
            return None
        features = None if self.features is None else self.features[tiles]
        return Images(
            self.pixel_values[tiles],
            [self.tiles_per_sample[r] for r in rows],
            [self.budgets[i] for i in tiles],
            features,
            self.routed,
        )


@dataclass
class Batch:
    """One vision-language view of R rows (a row: one sample, or several packed end to end), all ``(R, T)``:

    Attributes:
        input_ids: token ids (``<IMG_CONTEXT>`` slots where image features go), padding ``pad_id``.
        labels: the ids a token is trained to be, :data:`IGNORE_INDEX` elsewhere (unshifted).
        attention_mask: 1 on real tokens.
        positions: float32 rotary positions (each document from 0; V2PE's fractional ones on images).
        document_ids: packed rows: which document of the row a token belongs to (padding -1); None unpacked.
        images: the rows' tiles and budgets, None when no row has an image.
        sample_names: each row's record name(s) (``a+b`` for a packed row).
        meta, reference: unpacked rows: each record's ``meta`` and (prompts) the answer left out.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor | None
    images: Images | None
    sample_names: list[str]
    meta: list[dict | None] | None = None
    reference: list[str | None] | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return None if self.images is None else self.images.pixel_values

    @property
    def tiles_per_sample(self) -> list[int]:
        return [0] * self.rows if self.images is None else self.images.tiles_per_sample


@dataclass
class PairBatch:
    """Image–caption pairs for the dual-encoder stages (:mod:`lit_internvl.data.pairs`), B rows:

    Attributes:
        pixel_values: ``(B, 3, S, S)``, one tile per image.
        input_ids, attention_mask: ``(B, T)`` the ITC text (``"summarize:"`` + caption + end), right-padded.
        itm_ids, itm_mask: the ITM text of the row's caption.
        itg_ids, itg_mask, itg_labels: the ITG text (``"English caption:"`` + caption + end), its labels
            unshifted, :data:`IGNORE_INDEX` on the prefix and the padding.
        label: ``(B,)`` class labels (-1: none); caption_key ``(B,)``: rows with equal keys match each other;
            image_id ``(B,)``: which image a row shows (retrieval counts each image once).
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    itm_ids: torch.Tensor
    itm_mask: torch.Tensor
    itg_ids: torch.Tensor
    itg_mask: torch.Tensor
    itg_labels: torch.Tensor
    label: torch.Tensor
    caption_key: torch.Tensor
    image_id: torch.Tensor
    sample_names: list[str]

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TextBatch:
    """Texts alone, ``(B, T)`` right-padded: the ``negative`` view (the ITM text of another image's caption)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class ImageBatch:
    """Labelled images for the probes (:mod:`lit_internvl.data.labelled`), B rows, one tile each:

    Attributes:
        pixel_values: ``(B, 3, S, S)``, normalised.
        label: ``(B,)`` class labels (the ``image`` view; -1: none).
        mask: ``(B, S, S)`` a class per pixel, :data:`IGNORE_MASK` where none counts (the ``mask`` view), else None.
        sample_names: each row's name, unique across the splits of a source (the probes' feature cache keys).
    """

    pixel_values: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor | None
    sample_names: list[str]

    @property
    def rows(self) -> int:
        return self.pixel_values.shape[0]


#: A mask pixel that no loss or score counts (mmsegmentation's ``ignore_index``, its ``seg_pad_val``).
IGNORE_MASK = 255


@dataclass
class Views:
    """What a loader yields: the batch of every view the stage asked for, by view name, and the records skipped.

    Attributes:
        views: view name → its batch (empty when every record of the batch was skipped).
        skipped: a count of skipped records by reason; skipped_records: each one's ``{"name", "reason"}``.
    """

    views: dict[str, Batch | PairBatch | TextBatch | ImageBatch] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_records: list[dict] = field(default_factory=list)

    def __getitem__(self, name: str):
        return self.views[name]

    @property
    def empty(self) -> bool:
        """Every record of the batch was skipped: nothing to train on."""
        return not self.views

    @property
    def first(self) -> Batch | PairBatch | TextBatch | ImageBatch:
        """The first view's batch (what callbacks that log samples read)."""
        return next(iter(self.views.values()))
