"""Scoring solutions with a process-reward critic (VisualPRM): P(``+``) at every step in one forward pass.

The critic reads the whole conversation of :mod:`lit_internvl.data.critic` at once, every assistant answer
written as ``+``: causal attention means the logits before the k-th answer see exactly the question, the first k
steps and the k-1 answers before them, so one pass gives what k passes over growing prefixes would
(``tests/test_critic.py`` checks it). A step's score is the softmax over the two answer tokens' logits,
``P(+) = e^l+ / (e^l+ + e^l-)``; a solution's score aggregates its steps (``mean``, VisualPRM's choice for
Best-of-N; ``min``; ``last``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from lit_internvl.data.collate import Collator
from lit_internvl.data.critic import PRM_SYSTEM_PROMPT, critic_turns, label_ids, tokenize_critic
from lit_internvl.data.samples import SampleOptions
from lit_internvl.losses import supervised_positions

Aggregate = Literal["mean", "min", "last"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)


def step_probabilities(logits: torch.Tensor, labels: torch.Tensor, plus_id: int, minus_id: int) -> list[list[float]]:
    """``(N, V)`` logits at the N :func:`~lit_internvl.losses.supervised_positions` of ``labels (B, T)`` (the
    positions before each ``+``/``-``) → P(``+``) per step, one list per row."""
    pair = logits[:, [plus_id, minus_id]].float()  # (N, 2)
    plus = pair.softmax(dim=-1)[:, 0]
    counts = supervised_positions(labels).sum(dim=1).tolist()
    return [row.tolist() for row in plus.split(counts)]


@torch.no_grad()
def score_steps(critic, batch: dict, plus_id: int, minus_id: int) -> list[list[float]]:
    """P(``+``) at every step of every row of a collated critic batch, in one forward pass of ``critic``."""
    logits = critic(
        batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
        positions=batch["positions"], tiles_per_sample=batch["tiles_per_sample"], sample_names=batch["sample_names"],
        logits_at=supervised_positions(batch["labels"]),
    )  # fmt: skip
    return step_probabilities(logits, batch["labels"], plus_id, minus_id)


def aggregate(scores: Sequence[float], how: Aggregate = "mean") -> float:
    """One solution's score from its steps' P(``+``); a solution with no step scores 0."""
    if how not in AGGREGATES:
        raise ValueError(f"Unknown aggregate {how!r}; choose from {AGGREGATES}")
    if not scores:
        return 0.0
    return {"mean": sum(scores) / len(scores), "min": min(scores), "last": scores[-1]}[how]


def critic_batch(
    tokenizer, options: SampleOptions, question: str, steps: Sequence[Sequence[str]], pixel_values: torch.Tensor | None
) -> dict:
    """The critic's batch for several step-split solutions of one question about one image (its tiles
    ``pixel_values``, shared by every row), the answers all ``+`` (:func:`score_steps` reads them, not their labels).
    The system message is ``options.system`` (None: VisualPRM's prompt), the template ``options.template``."""
    tiles = 0 if pixel_values is None else pixel_values.shape[0]
    counts = [tiles * options.tokens_per_tile] if tiles else []
    system = PRM_SYSTEM_PROMPT if options.system is None else options.system
    samples = []
    for i, solution in enumerate(steps):
        turns = critic_turns(question, solution or [""], images=len(counts))
        ids, labels = tokenize_critic(turns, tokenizer, options.template, counts, system)
        samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "name": f"candidate {i}",
                        "pixel_values": pixel_values})  # fmt: skip
    return Collator(tokenizer.pad_id)(samples)


def score_solutions(
    critic, tokenizer, options: SampleOptions, question: str, steps: Sequence[Sequence[str]], pixel_values
) -> list[list[float]]:
    """P(``+``) per step of each solution (a list of steps; an empty one scores as one empty step)."""
    plus_id, minus_id = label_ids(tokenizer)
    batch = critic_batch(tokenizer, options, question, steps, pixel_values)
    device = next(critic.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return score_steps(critic, batch, plus_id, minus_id)
