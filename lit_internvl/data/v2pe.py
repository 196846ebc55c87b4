"""V2PE: variable visual position encoding (Ge et al. 2024, InternVL3's position scheme).

Text tokens, ``<img>`` included, advance the rotary position by 1. The N ``<IMG_CONTEXT>`` tokens of one
image (all its tiles and its thumbnail: one run) take ``p + k·δ`` for k = 1..N after the position p of
``<img>``, with ``δ = S / 256``; ``</img>`` then takes ``ceil(p + N·δ) + 1`` and text continues by 1. Training
draws S per image from ``{1, 2, 4, …, 256}`` (``v2pe: random``); evaluation fixes it (``v2pe: {stride: 64}``,
the reference's evaluation setting); ``v2pe: off`` (δ = 1) is plain RoPE, the positions ``0..L−1``.

The reference (OpenGVLab/V2PE, ``internvl/train/internvl_chat_finetune.py``, ``get_rope_pos_id``, lines
555-624) builds the same list with ``torch.arange(p, p + δ·(N + 1), δ)[1:]``; we compute ``p + k·δ``
directly (the same values where arange's float accumulation is exact, and never one element more or less).
It divides S by ``num_image_token``, the tokens of one tile, which is 256 in every released InternVL; we
divide by 256 always, so that a tiny model with few tokens a tile draws the increments a real one does.

Positions are float32 from the sample to the rotary angles (:mod:`lit_internvl.components.rotary`).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch

#: The strides training draws from, one per image (the reference's ``random_from``, line 587).
RANDOM_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: S / this is the increment δ of one image token; S = 256 is plain RoPE.
STRIDE_SCALE = 256
#: The stride evaluation uses after training with random strides (the reference's evaluation setting).
EVAL_STRIDE = 64

V2PEMode = Literal["off", "random"] | dict[str, int]


def check_v2pe(option: V2PEMode | None, key: str = "v2pe") -> V2PEMode:
    """``option`` validated: ``"off"``, ``"random"`` or ``{"stride": S}`` with S in 1..256 (None: ``"off"``)."""
    if option is None or option in ("off", "random"):
        return option or "off"
    if isinstance(option, dict) and set(option) == {"stride"} and isinstance(option["stride"], int):
        if 1 <= option["stride"] <= STRIDE_SCALE:
            return {"stride": option["stride"]}
    raise ValueError(
        f"{key} must be 'off', 'random' or {{stride: S}} with an integer S in 1..{STRIDE_SCALE}; got {option!r}"
    )


def eval_mode(option: V2PEMode) -> V2PEMode:
    """The setting held-out samples use: random strides become the fixed evaluation stride, others stay."""
    return {"stride": EVAL_STRIDE} if option == "random" else option


def draw_strides(option: V2PEMode, images: int, rng: random.Random) -> list[int]:
    """S for each of ``images`` images under ``option`` (``rng`` draws the random ones, in image order)."""
    if option == "off":
        return [STRIDE_SCALE] * images
    if option == "random":
        return [rng.choice(RANDOM_STRIDES) for _ in range(images)]
    return [option["stride"]] * images


def image_runs(input_ids: list[int], image_context_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of consecutive ``<IMG_CONTEXT>`` tokens (one image), end exclusive."""
    slots = torch.as_tensor(input_ids) == image_context_id
    edges = torch.diff(torch.nn.functional.pad(slots.to(torch.int8), (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))  # +1 where a run starts, -1 one past where it ends


def v2pe_positions(
    input_ids: list[int], image_context_id: int, strides: list[int], runs: list[tuple[int, int]] | None = None
) -> torch.Tensor:
    """The float32 positions ``(L,)`` of one document: image run i advances by ``strides[i] / 256`` a token.

    A run must follow a text token (``<img>``): its tokens continue from that token's position. ``runs``: the
    :func:`image_runs` of ``input_ids`` when the caller has them.
    """
    runs = image_runs(input_ids, image_context_id) if runs is None else runs
    if len(runs) != len(strides):
        raise ValueError(f"{len(runs)} image runs in the sample but {len(strides)} strides")
    positions = torch.empty(len(input_ids), dtype=torch.float64)  # float64 while building, float32 at the end
    cursor, last = 0, -1.0  # last: the position of the token before ``cursor``
    for (start, end), stride in zip(runs, strides):
        text = torch.arange(start - cursor, dtype=torch.float64) + math.ceil(last) + 1
        positions[cursor:start] = text
        anchor = text[-1].item() if len(text) else math.ceil(last)
        delta = stride / STRIDE_SCALE
        positions[start:end] = anchor + delta * torch.arange(1, end - start + 1, dtype=torch.float64)
        cursor, last = end, positions[end - 1].item()
    positions[cursor:] = torch.arange(len(input_ids) - cursor, dtype=torch.float64) + math.ceil(last) + 1
    return positions.float()


def sample_positions(
    input_ids: list[int], image_context_id: int, option: V2PEMode, rng: random.Random
) -> torch.Tensor | None:
    """The positions of one sample under ``option`` (None for ``off``: the collator's ``0..L−1``)."""
    if option == "off":
        return None
    runs = image_runs(input_ids, image_context_id)
    return v2pe_positions(input_ids, image_context_id, draw_strides(option, len(runs), rng), runs)


def next_position(positions: torch.Tensor) -> torch.Tensor:
    """The position of the token after one at ``positions`` (text after an image span advances from its ceiling)."""
    return positions.ceil() + 1
