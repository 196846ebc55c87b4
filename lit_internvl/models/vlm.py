"""VisionLanguageModel: image encoder → connector → language decoder (InternVL 1.5–3, "ViT-MLP-LLM").

::

    pixel_values ─► vision ─► connector ─┐  tokens (tiles·T, D)
                                         ▼  spliced at the <IMG_CONTEXT> positions
    input_ids ───► decoder.embed_tokens ─► inputs_embeds ─► decoder ─► hidden ─► head (logits, or the loss)

This is the one place where image features enter the text sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn as nn

from lit_internvl.batch import IGNORE_INDEX, Images
from lit_internvl.components.sequence_parallel import SequenceParallel
from lit_internvl.losses import HEAD_CHUNK_SIZE, HeadBackend, linear_cross_entropy
from lit_internvl.models.sequence_parallel import split_forward


class ImageTokenMismatchError(ValueError):
    """The number of ``<IMG_CONTEXT>`` tokens in a sample disagrees with its images' features."""


class VisionLanguageModel(nn.Module):
    """Vision encoder → connector → decoder, the image features spliced at ``<IMG_CONTEXT>``.

    Args:
        vision, connector, decoder: components with the contracts of :mod:`lit_internvl.components`.
        image_context_id: the tokenizer's id of ``<IMG_CONTEXT>``.
        tile_size: the side of the tiles the model reads (trains on, exports at); default the
            encoder's native ``config.image_size``. A stage sets it from its data in the handshake.

    ``dummy_tile``: a batch without images still runs the vision encoder and connector, on one black tile whose
    features enter the embeddings multiplied by zero. Under FSDP2 every rank all-gathers the encoder's
    parameters in its forward and reduce-scatters their gradients in its backward; a rank that skipped the
    encoder on a text-only batch would leave the others waiting in those collectives. InternVL does the same
    with a dummy image and ``image_flags`` 0 for text-only samples (``internvl_chat_finetune.py``,
    ``pure_text_get_item``; ``modeling_internvl_chat.py``, ``vit_embeds[image_flags == 1]``). A stage turns
    it on when it trains on more than one process (:class:`~lit_internvl.stages.VisionLanguageStage`).

    ``sequence_parallel``: a :class:`~lit_internvl.components.sequence_parallel.SequenceParallel` group, or None. Set,
    ``forward`` splits its rows over the group (:mod:`lit_internvl.models.sequence_parallel`) and returns on every rank
    what one process returns on the whole batch.
    """

    def __init__(
        self,
        vision: nn.Module,
        connector: nn.Module,
        decoder: nn.Module,
        image_context_id: int,
        tile_size: int | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.decoder = decoder
        self.image_context_id = image_context_id
        if tile_size is None:
            config = getattr(vision, "config", None)
            if config is None:
                raise ValueError(
                    f"tile_size is needed: the vision encoder {type(vision).__name__} has no config.image_size"
                )
            tile_size = config.image_size
        self.tile_size = tile_size
        self.dummy_tile = False
        self.sequence_parallel: SequenceParallel | None = None

    def budgets(self, tile_size: int | None = None) -> tuple[int, ...]:
        """The ``<IMG_CONTEXT>`` tokens a ``tile_size`` px tile (default :attr:`tile_size`) can become: the
        connector's budgets (``connector.budgets(P)`` when it declares several, else ``tokens_per_tile(P)``),
        the first being the default."""
        side = (self.tile_size if tile_size is None else tile_size) // self.vision.patch_size
        patches = side * side
        if hasattr(self.connector, "budgets"):
            return tuple(self.connector.budgets(patches))
        return (self.connector.tokens_per_tile(patches),)

    def tokens_per_tile(self, tile_size: int | None = None) -> int:
        """The default budget: ``<IMG_CONTEXT>`` tokens a tile becomes unless it asks for another."""
        return self.budgets(tile_size)[0]

    def as_images(self, images: Images | torch.Tensor | None) -> Images | None:
        """``images``, with bare tiles ``(tiles, 3, H, W)`` read as one row's tiles at the default budget."""
        if images is None or isinstance(images, Images):
            return images
        return Images.uniform(images, [images.shape[0]], self.budgets()[0])

    def embed_images(self, images: Images | torch.Tensor) -> torch.Tensor:
        """The tiles' features ``(Σ budgets, D)`` in the decoder's embedding space, tile after tile: each tile's
        vision features through the connector at that tile's budget (one connector call per budget); the features
        the images carry when routing already computed them (``Images.features``)."""
        images = self.as_images(images)
        features = images.features if images.features is not None else self.vision(images.pixel_values)
        budgets = torch.tensor(images.budgets)
        kinds = budgets.unique().tolist()
        if len(kinds) == 1:
            return self._connect(features, kinds[0]).flatten(0, 1)
        # Several budgets: each group of tiles through its connector, then the tiles back in their order.
        per_tile: list[torch.Tensor | None] = [None] * len(images.budgets)
        for budget in kinds:
            index = (budgets == budget).nonzero().flatten()
            for i, tokens in zip(index.tolist(), self._connect(features[index.to(features.device)], budget)):
                per_tile[i] = tokens
        return torch.cat(per_tile)

    def _connect(self, features: torch.Tensor, budget: int) -> torch.Tensor:
        """``(tiles, 1 + P, C)`` → ``(tiles, budget, D)``; a single-budget connector is called as it always was."""
        if hasattr(self.connector, "budgets"):
            return self.connector(features, budget=budget)
        tokens = self.connector(features)
        if tokens.shape[1] != budget:
            raise ImageTokenMismatchError(
                f"model.init_args.connector {type(self.connector).__name__} gives {tokens.shape[1]} tokens a tile, "
                f"the images ask for {budget}"
            )
        return tokens

    def embed(
        self,
        input_ids: torch.Tensor,
        images: Images | torch.Tensor | None = None,
        sample_names: Sequence[str] | None = None,
        repeat_images: int = 1,
    ) -> torch.Tensor:
        """Token embeddings ``(B, T, D)`` with image features written over the ``<IMG_CONTEXT>`` slots.

        ``images`` (:class:`~lit_internvl.batch.Images`: each row's tiles and each tile's budget) lets a
        mismatch name the sample (``sample_names[b]`` when given, else its row index); bare tiles are the tiles of
        every row at the default budget. With ``repeat_images`` G, the images are those of B / G samples, each
        serving G consecutive rows: the vision tower runs once for the G answers of one prompt (online RL).
        """
        embeds = self.decoder.embed_tokens(input_ids)
        slots = input_ids == self.image_context_id
        images = self.as_images(images)
        if images is None or images.pixel_values.shape[0] == 0:
            if slots.any():
                rows = slots.any(dim=1).nonzero().flatten().tolist()
                raise ImageTokenMismatchError(
                    f"{_names(rows, sample_names)} hold <IMG_CONTEXT> tokens but the batch has no images"
                )
            if self.dummy_tile:
                tile = torch.zeros(1, 3, self.tile_size, self.tile_size, device=embeds.device)  # as the collator's
                embeds = embeds + 0.0 * self.embed_images(tile).sum().to(embeds.dtype)
            return embeds
        features = self.embed_images(images)
        tokens = images.tokens_per_sample()
        if repeat_images > 1:
            per_sample = features.split(tokens)
            features = torch.cat([part for part in per_sample for _ in range(repeat_images)])
            tokens = [count for count in tokens for _ in range(repeat_images)]
        self._check_counts(slots, tokens, images, sample_names, repeat_images)
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def _check_counts(self, slots, tokens, images: Images, sample_names, repeat_images: int) -> None:
        slot_counts = slots.sum(dim=1).tolist()
        if len(tokens) == 1 and len(slot_counts) > 1:  # bare tiles: every row's, counted together
            if sum(slot_counts) != tokens[0]:
                raise ImageTokenMismatchError(
                    f"The batch has {sum(slot_counts)} <IMG_CONTEXT> tokens (per sample: {slot_counts}) but its "
                    f"{len(images.budgets)} tile(s) give {tokens[0]} image features"
                )
            return
        if len(tokens) != len(slot_counts):
            raise ImageTokenMismatchError(
                f"the images describe {len(tokens) // repeat_images} sample(s) (tiles_per_sample "
                f"{list(images.tiles_per_sample)}), the batch has {len(slot_counts) // repeat_images}"
            )
        for row, (count, expected) in enumerate(zip(slot_counts, tokens)):
            if count != expected:
                tiles = images.tiles_per_sample[row // repeat_images]
                raise ImageTokenMismatchError(
                    f"{_names([row], sample_names)} has {count} <IMG_CONTEXT> tokens but its {tiles} tile(s) give "
                    f"{expected} image features"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Images | torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        sample_names: Sequence[str] | None = None,
        repeat_images: int = 1,
        length_multiple: int | None = None,
        head: Head | None = None,
    ) -> torch.Tensor:
        """input_ids ``(B, T)`` and their images → the decoder's hidden states ``(B, T, D)``, or what ``head``
        makes of them (:class:`Logits`, :class:`CrossEntropy`): run inside ``forward``, so that a sharded output
        head is gathered with the rest of the model.

        With ``length_multiple`` the decoder runs on rows padded to a multiple of it (padding masked, its outputs
        dropped): compiled blocks then see a few lengths instead of one per batch.
        """
        if self.sequence_parallel is not None:
            return split_forward(
                self, self.sequence_parallel, input_ids, images, attention_mask=attention_mask, positions=positions,
                document_ids=document_ids, sample_names=sample_names, repeat_images=repeat_images,
                length_multiple=length_multiple, head=head,
            )  # fmt: skip
        embeds = self.embed(input_ids, images, sample_names, repeat_images)
        length = embeds.shape[1]
        if length_multiple:
            embeds, attention_mask, positions, document_ids = _pad_length(
                length_multiple, embeds, attention_mask, positions, document_ids
            )
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, document_ids=document_ids
        )[:, :length]
        return hidden if head is None else head(self.decoder, hidden)


class Head(Protocol):
    """What the output head computes from the hidden states ``(B, T, D)``, given the decoder that owns it.

    A head that rows split over a sequence-parallel group can use also has ``chosen()``, the ``(B, T)`` positions whose
    outputs it returns row-major (None: every position, ``(B, T, ...)``), and ``columns(columns, width)``, the same head
    for those columns of the rows right-padded to ``width`` (:mod:`lit_internvl.models.sequence_parallel`)."""

    def __call__(self, decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Logits:
    """Logits ``(B, T, vocab)``, or ``(N, vocab)`` at the N positions of ``at`` (a ``(B, T)`` bool mask),
    row-major: training needs them only where a target is supervised
    (:func:`~lit_internvl.losses.supervised_positions`), and prompts and image tokens are most of a multimodal
    sequence, so this skips most of the vocabulary projection."""

    at: torch.Tensor | None = None

    def __call__(self, decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return decoder.head(hidden if self.at is None else hidden[self.at])

    def chosen(self) -> torch.Tensor | None:
        return self.at

    def columns(self, columns: slice, width: int) -> Logits:
        return self if self.at is None else Logits(_pad_right(self.at, width, False)[:, columns])


@dataclass
class CrossEntropy:
    """The ``(N,)`` float32 cross-entropies at the N positions where ``targets`` (``(B, T)`` next-token ids, -100
    where not trained: :func:`~lit_internvl.losses.next_token_targets`) has one, row-major: the head and the loss
    computed together in chunks of ``chunk_size`` rows (:func:`~lit_internvl.losses.linear_cross_entropy`,
    ``backend``), so that the ``(N, vocab)`` logits never exist at once."""

    targets: torch.Tensor
    chunk_size: int = HEAD_CHUNK_SIZE
    backend: HeadBackend = "chunked"

    def __call__(self, decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        supervised = self.targets != IGNORE_INDEX
        return linear_cross_entropy(
            hidden[supervised], decoder.head_weight, self.targets[supervised], self.chunk_size, self.backend
        )

    def chosen(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    def columns(self, columns: slice, width: int) -> CrossEntropy:
        return replace(self, targets=_pad_right(self.targets, width, IGNORE_INDEX)[:, columns])


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    """``(B, T)`` → ``(B, width)``, filled with ``value`` on the right."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _pad_length(multiple: int, embeds, attention_mask, positions, document_ids):
    """The decoder's inputs padded on the right to a multiple of ``multiple`` tokens: padding masked out, its own
    document (-1, as the packing collator's), positions continuing."""
    batch, length = embeds.shape[:2]
    pad = -length % multiple
    if pad == 0:
        return embeds, attention_mask, positions, document_ids
    device = embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if positions is None:
        positions = torch.arange(length, device=device, dtype=torch.float32).expand(batch, -1)
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    attention_mask = torch.nn.functional.pad(attention_mask, (0, pad), value=0)
    positions = torch.nn.functional.pad(positions, (0, pad), value=0.0)
    if document_ids is not None:
        document_ids = torch.nn.functional.pad(document_ids, (0, pad), value=-1)
    return embeds, attention_mask, positions, document_ids


def _names(rows: list[int], sample_names: Sequence[str] | None) -> str:
    if sample_names is None:
        return "Sample(s) at batch row(s) " + ", ".join(map(str, rows))
    return "Sample(s) " + ", ".join(repr(sample_names[row]) for row in rows)
