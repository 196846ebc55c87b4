"""Rollouts: G answers to each of B prompts in one batched generation, for online RL and Best-of-N.

::

    B left-padded prompts (any mix of tile counts) ─► embed: the vision tower once per prompt ─► prefill B rows
        ─► KV cache, mask, positions repeated G times ─► B·G rows, row b·G + g drawn with generator seeds[b·G + g]

Row r samples from its own logits with its own ``torch.Generator`` and one draw a step, so each row is, token
for token, what :func:`~lit_internvl.inference.generate.generate` gives for its prompt alone with that
generator. Prompt positions are the collator's (V2PE's fractional image positions included); each new token
takes ``ceil(last) + 1``.

:class:`RolloutEngine` is the interface an RL stage samples through; :class:`BuiltinSampler` (this module's
:func:`sample_groups`, KV cache) runs everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lit_internvl.batch import Batch, Images
from lit_internvl.components.language import KVCache
from lit_internvl.data.v2pe import next_position
from lit_internvl.distributed import on_every_rank
from lit_internvl.inference.generate import sample_next
from lit_internvl.models.routing import route_prompts, routes


@torch.no_grad()
def sample_groups(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: Images | torch.Tensor | None,
    seeds: Sequence[int],
    positions: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """``len(seeds) / B`` answers to each of the B left-padded prompts ``input_ids (B, T)`` and their ``images``; returns the B·G
    answers' tokens (up to and including ``eos_id``), prompt b's answers at rows ``b·G … b·G + G − 1``.
    ``banned_tokens`` are never drawn (their logits −∞; RL bans the image tokens, which an answer cannot hold)."""
    rows, device, decoder = input_ids.shape[0], input_ids.device, model.decoder
    if len(seeds) % rows:
        raise ValueError(f"{len(seeds)} seeds do not split into groups for {rows} prompts")
    group = len(seeds) // rows
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("Prompts must be left-padded: the last column of attention_mask has padding")
    if routes(model):  # InternVL3.5-Flash: the router picks each tile's budget, the prompts shorten
        input_ids, attention_mask, images, positions = route_prompts(
            model, input_ids, attention_mask, images, positions
        )
    if positions is None:
        positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0).float()
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    embeds = model.embed(input_ids, images)  # the vision tower runs here, once a prompt
    cache = KVCache(len(decoder.layers))
    hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions.float(), cache=cache)
    repeat = torch.arange(rows, device=device).repeat_interleave(group)
    banned = torch.tensor(list(banned_tokens), dtype=torch.long, device=device)

    def head(states: torch.Tensor) -> torch.Tensor:
        logits = decoder.head(states)
        return logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits

    logits = head(hidden[:, -1])[repeat]
    cache.select(repeat)
    mask, positions = attention_mask[repeat], positions.float()[repeat]
    n = len(seeds)
    out: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    for _ in range(max_new_tokens):
        token = torch.full((n,), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
        for r in range(n):  # one draw a row from its own generator, as a lone run would draw
            if not finished[r]:
                token[r] = sample_next(logits[r : r + 1], temperature, top_p, generators[r])[0]
                out[r].append(int(token[r]))
                finished[r] = eos_id is not None and out[r][-1] == eos_id
        if on_every_rank(all(finished), model, device):  # a sharded model's ranks stop together
            break
        step_position = next_position(positions[:, -1:])
        positions = torch.cat((positions, step_position), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        step_embed = decoder.embed_tokens(token[:, None]).to(embeds.dtype)
        hidden = decoder(inputs_embeds=step_embed, attention_mask=mask, positions=step_position, cache=cache)
        logits = head(hidden[:, -1])
    return out


class RolloutEngine(Protocol):
    """How an RL stage gets its answers: ``sample(model, batch, seeds, **sampling)`` → B·G token lists for the
    batch's B left-padded prompts (prompt b's answers at rows b·G …), ``sampling`` being ``max_new_tokens``,
    ``eos_id``, ``temperature``, ``top_p``, ``banned_tokens``. An engine outside the process (vLLM) would also take the policy's
    weights before each rollout; the built-in one samples the policy itself."""

    def sample(self, model, batch: Batch, seeds: Sequence[int], **sampling) -> list[list[int]]: ...


class BuiltinSampler:
    """:func:`sample_groups` on the policy itself (KV cache; CPU and GPU)."""

    def sample(self, model, batch: Batch, seeds: Sequence[int], **sampling) -> list[list[int]]:
        return sample_groups(
            model, batch.input_ids, batch.attention_mask, batch.images, seeds, positions=batch.positions, **sampling
        )
