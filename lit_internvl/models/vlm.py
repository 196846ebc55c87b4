"""VisionLanguageModel: image encoder → connector → language decoder (InternVL 1.5–3, "ViT-MLP-LLM").

::

    pixel_values ─► vision ─► connector ─┐  tokens (tiles·T, D)
                                         ▼  spliced at the <IMG_CONTEXT> positions
    input_ids ───► decoder.embed_tokens ─► inputs_embeds ─► decoder ─► head ─► logits

This is the one place where image features enter the text sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from lit_internvl.losses import HEAD_CHUNK_SIZE, IGNORE_INDEX, HeadBackend, linear_cross_entropy


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

    def tokens_per_tile(self, tile_size: int | None = None) -> int:
        """``<IMG_CONTEXT>`` tokens a prompt reserves per ``tile_size`` px tile (default :attr:`tile_size`)."""
        side = (self.tile_size if tile_size is None else tile_size) // self.vision.patch_size
        return self.connector.tokens_per_tile(side * side)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(tiles, 3, H, W)`` → ``(tiles, tokens_per_tile, D)`` in the decoder's embedding space."""
        return self.connector(self.vision(pixel_values))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        tiles_per_sample: Sequence[int] | None = None,
        sample_names: Sequence[str] | None = None,
        repeat_images: int = 1,
    ) -> torch.Tensor:
        """Token embeddings ``(B, T, D)`` with image features written over the ``<IMG_CONTEXT>`` slots.

        ``tiles_per_sample`` (tiles of each row, in the order of ``pixel_values``) lets a mismatch
        name the sample (``sample_names[b]`` when given, else its row index). With ``repeat_images`` G, the
        images (and ``tiles_per_sample``) are those of B / G samples, each serving G consecutive rows: the
        vision tower runs once for the G answers of one prompt (online RL).
        """
        embeds = self.decoder.embed_tokens(input_ids)
        slots = input_ids == self.image_context_id
        if pixel_values is None or pixel_values.shape[0] == 0:
            if slots.any():
                rows = slots.any(dim=1).nonzero().flatten().tolist()
                raise ImageTokenMismatchError(
                    f"{_names(rows, sample_names)} hold <IMG_CONTEXT> tokens but the batch has no images"
                )
            if self.dummy_tile:
                tile = torch.zeros(1, 3, self.tile_size, self.tile_size, device=embeds.device)  # as the collator's
                embeds = embeds + 0.0 * self.embed_images(tile).sum().to(embeds.dtype)
            return embeds
        features = self.embed_images(pixel_values)
        if repeat_images > 1:
            if tiles_per_sample is None:
                raise ValueError("repeat_images needs tiles_per_sample, to know which tiles are whose")
            per_sample = features.split(list(tiles_per_sample))
            features = torch.cat([part for part in per_sample for _ in range(repeat_images)])
            tiles_per_sample = [tiles for tiles in tiles_per_sample for _ in range(repeat_images)]
        self._check_counts(slots, features, tiles_per_sample, sample_names)
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], features)

    def _check_counts(self, slots, features, tiles_per_sample, sample_names) -> None:
        tokens_per_tile = features.shape[1]
        slot_counts = slots.sum(dim=1).tolist()
        if tiles_per_sample is not None:
            if len(tiles_per_sample) != len(slot_counts) or sum(tiles_per_sample) != features.shape[0]:
                raise ImageTokenMismatchError(
                    f"tiles_per_sample {list(tiles_per_sample)} does not describe {len(slot_counts)} samples "
                    f"and {features.shape[0]} tiles"
                )
            for row, (count, tiles) in enumerate(zip(slot_counts, tiles_per_sample)):
                if count != tiles * tokens_per_tile:
                    raise ImageTokenMismatchError(
                        f"{_names([row], sample_names)} has {count} <IMG_CONTEXT> tokens but its {tiles} "
                        f"tile(s) give {tiles * tokens_per_tile} image features ({tokens_per_tile} per tile)"
                    )
        elif sum(slot_counts) != features.shape[0] * tokens_per_tile:
            raise ImageTokenMismatchError(
                f"The batch has {sum(slot_counts)} <IMG_CONTEXT> tokens (per sample: {slot_counts}) but its "
                f"{features.shape[0]} tile(s) give {features.shape[0] * tokens_per_tile} image features"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        tiles_per_sample: Sequence[int] | None = None,
        sample_names: Sequence[str] | None = None,
        logits_at: torch.Tensor | None = None,
        repeat_images: int = 1,
        targets: torch.Tensor | None = None,
        head_chunk_size: int = HEAD_CHUNK_SIZE,
        head_backend: HeadBackend = "chunked",
        length_multiple: int | None = None,
    ) -> torch.Tensor:
        """input_ids ``(B, T)``, pixel_values ``(tiles, 3, H, W)`` → logits ``(B, T, vocab)``.

        With ``logits_at`` (a ``(B, T)`` bool mask) only those positions go through the head, giving
        logits ``(N, vocab)`` in row-major order: training needs them only where a target is
        supervised (:func:`~lit_internvl.losses.supervised_positions`), and prompts and image tokens
        are most of a multimodal sequence, so this skips most of the vocabulary projection.

        With ``targets`` (``(B, T)`` next-token ids, -100 where not trained:
        :func:`~lit_internvl.losses.next_token_targets`) it returns instead the ``(N,)`` float32 cross-entropies at
        the N positions with a target, row-major: the head and the loss computed together in chunks of
        ``head_chunk_size`` rows (:func:`~lit_internvl.losses.linear_cross_entropy`, ``head_backend``), so that the
        ``(N, vocab)`` logits never exist at once. Inside ``forward``, so that a sharded head is gathered as usual.

        With ``length_multiple`` the decoder runs on rows padded to a multiple of it (padding masked, its outputs
        dropped): compiled blocks then see a few lengths instead of one per batch.
        """
        if targets is not None and logits_at is not None:
            raise ValueError("Pass logits_at (logits at those positions) or targets (cross-entropies), not both")
        embeds = self.embed(input_ids, pixel_values, tiles_per_sample, sample_names, repeat_images)
        length = embeds.shape[1]
        if length_multiple:
            embeds, attention_mask, positions, document_ids = _pad_length(
                length_multiple, embeds, attention_mask, positions, document_ids
            )
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, document_ids=document_ids
        )[:, :length]
        if targets is None:
            return self.decoder.head(hidden if logits_at is None else hidden[logits_at])
        supervised = targets != IGNORE_INDEX
        return linear_cross_entropy(
            hidden[supervised], self.decoder.head_weight, targets[supervised], head_chunk_size, head_backend
        )


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
