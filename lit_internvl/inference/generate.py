"""Autoregressive generation for :class:`~lit_internvl.models.VisionLanguageModel`: greedy,
temperature and nucleus (top-p) sampling, with or without a KV cache (same tokens either way)."""

from __future__ import annotations

import torch

from lit_internvl.batch import Images
from lit_internvl.components.language import KVCache
from lit_internvl.data.v2pe import next_position
from lit_internvl.distributed import on_every_rank
from lit_internvl.models.routing import route_prompts, routes


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """``(B, V)`` logits → ``(B,)`` token ids: argmax when ``temperature`` is 0, else a draw from the
    tempered distribution restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: Images | torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
) -> list[list[int]]:
    """Continue left-padded prompts ``input_ids (B, T)`` (``attention_mask`` 1 on real tokens) and their
    ``images`` (:class:`~lit_internvl.batch.Images`, or bare tiles at the default budget).

    ``positions`` are the prompts' own (the collator's, V2PE's fractional image positions among them);
    None numbers each prompt's tokens from 0. A new token takes ``ceil(last position) + 1``: one past the
    text before it, as V2PE continues after an image span.
    Returns the new tokens of each row, up to and including ``eos_id`` or ``max_new_tokens``.
    Without the cache every step re-runs the whole sequence: the reference the cache is tested against.
    A model whose connector routes (InternVL3.5-Flash) first lets its router pick each tile's budget and shortens the
    prompts to match (:mod:`lit_internvl.models.routing`).
    """
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("Prompts must be left-padded: the last column of attention_mask has padding")
    if routes(model):
        input_ids, attention_mask, images, positions = route_prompts(
            model, input_ids, attention_mask, images, positions
        )
    embeds = model.embed(input_ids, images)
    decoder = model.decoder
    cache = KVCache(len(decoder.layers)) if use_cache else None
    if positions is None:
        positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0).float()
    positions = positions.float()
    new_tokens = torch.empty(batch, 0, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    step_embeds, step_positions, mask = embeds, positions, attention_mask
    for _ in range(max_new_tokens):
        hidden = decoder(inputs_embeds=step_embeds, attention_mask=mask, positions=step_positions, cache=cache)
        token = sample_next(decoder.head(hidden[:, -1]), temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        new_tokens = torch.cat((new_tokens, token[:, None]), dim=1)
        if on_every_rank(bool(finished.all()), model, finished.device):  # a sharded model's ranks stop together
            break
        next_embed = decoder.embed_tokens(token[:, None]).to(embeds.dtype)
        step_position = next_position(positions[:, -1:])
        positions = torch.cat((positions, step_position), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        embeds = torch.cat((embeds, next_embed), dim=1)
        step_embeds, step_positions = (next_embed, step_position) if use_cache else (embeds, positions)
    out = []
    for row in new_tokens.tolist():
        out.append(row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row)
    return out
