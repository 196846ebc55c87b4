"""Scoring solutions with a process-reward critic (VisualPRM): P(``+``) at every step in one forward pass.

The critic reads the whole conversation of :mod:`lit_internvl.data.critic` at once, every assistant answer
written as ``+``: causal attention means the logits before the k-th answer see exactly the question, the first k
steps and the k-1 answers before them, so one pass gives what k passes over growing prefixes would
(``tests/test_critic.py`` checks it). A step's score is the softmax over the two answer tokens' logits,
``P(+) = e^l+ / (e^l+ + e^l-)``; a solution's score aggregates its steps (``mean``, VisualPRM's choice for
Best-of-N; ``min``; ``last``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal, get_args

import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device

from lit_internvl.batch import IGNORE_INDEX, Batch
from lit_internvl.data.collate import Collator
from lit_internvl.data.critic import (
    BAD,
    GOOD,
    PRM_SYSTEM_PROMPT,
    STEP_SEPARATOR,
    critic_turns,
    label_ids,
    tokenize_critic,
)
from lit_internvl.data.samples import SampleOptions
from lit_internvl.data.views import View
from lit_internvl.inference.rollout import sample_groups
from lit_internvl.losses import supervised_positions
from lit_internvl.models.vlm import Logits
from lit_internvl.rewards import final_answer

Aggregate = Literal["mean", "min", "last"]
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)


def step_probabilities(logits: torch.Tensor, labels: torch.Tensor, plus_id: int, minus_id: int) -> list[list[float]]:
    """``(N, V)`` logits at the N :func:`~lit_internvl.losses.supervised_positions` of ``labels (B, T)`` (the
    positions before each ``+``/``-``) → P(``+``) per step, one list per row."""
    pair = logits[:, [plus_id, minus_id]].float()  # (N, 2)
    plus = pair.softmax(dim=-1)[:, 0]
    counts = supervised_positions(labels).sum(dim=1).tolist()
    return [row.tolist() for row in plus.split(counts)]


def as_scored(batch: Batch, plus_id: int) -> Batch:
    """A collated critic batch with every answer written ``+``, as scoring writes them: the critic reads the steps,
    not the record's labels. With the labels in the context, the answer after a ``-`` is always ``-`` (a step is
    correct only when all before it are), which a critic can copy instead of judging the step; its accuracy read
    that way says nothing of what Best-of-N sees."""
    input_ids = batch.input_ids.clone()
    input_ids[batch.labels != IGNORE_INDEX] = plus_id  # the labelled tokens are the answers themselves
    return replace(batch, input_ids=input_ids)


@torch.no_grad()
def score_steps(critic, batch: Batch, plus_id: int, minus_id: int) -> list[list[float]]:
    """P(``+``) at every step of every row of a collated critic batch, in one forward pass of ``critic``, the
    answers read as ``+`` whatever the batch's labels (:func:`as_scored`)."""
    batch = as_scored(batch, plus_id)
    logits = critic(
        batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
        sample_names=batch.sample_names, head=Logits(supervised_positions(batch.labels)),
    )  # fmt: skip
    return step_probabilities(logits, batch.labels, plus_id, minus_id)


def load_critic(source: str, like: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A critic from ``source``: ``hf:/folder`` (either InternVL layout, with ``like``'s ``<IMG_CONTEXT>`` id), or a
    ``.ckpt``/``.safetensors`` of the architecture ``build()`` makes, reading tiles of ``like``'s size."""
    from lit_internvl.checkpoints import read_state_dict

    if source.startswith("hf:"):
        from lit_internvl.hf import load_vlm

        return load_vlm(source.removeprefix("hf:"), image_context_id=like.image_context_id)
    critic = build()
    critic.tile_size = like.tile_size
    critic.load_state_dict(read_state_dict(source))
    return critic


def aggregate(scores: Sequence[float], how: Aggregate = "mean") -> float:
    """One solution's score from its steps' P(``+``); a solution with no step scores 0."""
    if how not in AGGREGATES:
        raise ValueError(f"Unknown aggregate {how!r}; choose from {AGGREGATES}")
    if not scores:
        return 0.0
    return {"mean": sum(scores) / len(scores), "min": min(scores), "last": scores[-1]}[how]


def critic_batch(
    tokenizer, options: SampleOptions, question: str, steps: Sequence[Sequence[str]],
    pixel_values: torch.Tensor | None, budget: int,
) -> Batch:  # fmt: skip
    """The critic's batch for several step-split solutions of one question about one image (its tiles
    ``pixel_values``, shared by every row, ``budget`` tokens each), the answers all ``+`` (:func:`score_steps` reads
    them, not their labels). The system message is ``options.system`` (None: VisualPRM's prompt), the template
    ``options.template``."""
    tiles = 0 if pixel_values is None else pixel_values.shape[0]
    counts = [tiles * budget] if tiles else []
    system = PRM_SYSTEM_PROMPT if options.system is None else options.system
    samples = []
    for i, solution in enumerate(steps):
        turns = critic_turns(question, solution or [""], images=len(counts))
        ids, labels = tokenize_critic(turns, tokenizer, options.template, counts, system)
        samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "name": f"candidate {i}",
                        "pixel_values": pixel_values, "budget": budget})  # fmt: skip
    view = View("conversation", budget)
    return Collator(tokenizer.pad_id, (view,)).collate(samples, view)


def score_solutions(
    critic, tokenizer, options: SampleOptions, question: str, steps: Sequence[Sequence[str]], pixel_values
) -> list[list[float]]:
    """P(``+``) per step of each solution (a list of steps; an empty one scores as one empty step)."""
    plus_id, minus_id = label_ids(tokenizer)
    batch = critic_batch(tokenizer, options, question, steps, pixel_values, critic.budgets()[0])
    return score_steps(critic, move_data_to_device(batch, next(critic.parameters()).device), plus_id, minus_id)


@torch.no_grad()
def monte_carlo_labels(
    policy,
    tokenizer,
    prompt: dict,
    solutions: Sequence[Sequence[str]],
    answer: str,
    samples: int = 16,
    seed: int = 0,
    threshold: float = 0.0,
    early_stop: bool = True,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[dict]:
    """VisualPRM's Monte-Carlo step labels of ``solutions`` (each a list of steps) to one prompt whose true final
    answer is ``answer``: the policy continues every step prefix ``samples`` times, a prefix's score is the share of
    continuations whose final answer (:func:`~lit_internvl.rewards.final_answer`) is right, and a step is ``+``
    when its score exceeds ``threshold`` (0: at least one continuation right).

    The reference (OpenGVLab/InternVL ``internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pieline.py``,
    ``build_mc_scores`` L174-251): the prefix ``steps[:k+1]`` joined by blank lines is the assistant's partial turn,
    a continuation is appended to it as it is, ``--num-mc-sequences`` 16; with ``early_stop`` a step after a score
    of 0 is not continued and scores 0 (L191-197, L246-247; ``visualprm_data_pipeline_postprocess.py``
    ``item2conv_prm`` L20-44 turns scores into labels with ``--mc-threshold`` 0.0). Here every prefix of every
    solution is continued in one batched generation (:func:`~lit_internvl.inference.rollout.sample_groups`, the
    prompt's image once per prefix), prefix ``b``'s continuation ``j`` drawn with seed ``seed + b·samples + j``; early
    stopping is then applied to the scores, which gives the reference's labels (a step after a zero is ``-``
    whatever its continuations).

    ``prompt`` is one prompt sample (the ``prompt`` view of a :class:`~lit_internvl.data.samples.SampleBuilder`: ``input_ids`` ending in
    the assistant's header, ``pixel_values``). Returns per solution ``{"steps", "labels", "scores"}``."""
    if prompt.get("positions") is not None:
        raise ValueError("monte_carlo_labels continues plain prompts; V2PE prompt positions are not supported")
    prefixes = [STEP_SEPARATOR.join(steps[: k + 1]) for steps in solutions for k in range(len(steps))]
    budget = prompt.get("budget") or policy.budgets()[0]  # the prompt's own tiles' budget, else the default
    if not prefixes:
        return [{"steps": list(steps), "labels": [], "scores": []} for steps in solutions]
    rows = []
    for i, prefix in enumerate(prefixes):
        ids = torch.cat([torch.as_tensor(prompt["input_ids"]), torch.tensor(tokenizer.encode(prefix))])
        rows.append({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "pixel_values": prompt.get("pixel_values"),
                     "budget": budget, "name": f"prefix {i}"})  # fmt: skip
    view = View("prompt", budget)
    batch = move_data_to_device(
        Collator(tokenizer.pad_id, (view,)).collate(rows, view), next(policy.parameters()).device
    )
    seeds = [seed + b * samples + j for b in range(len(prefixes)) for j in range(samples)]
    drawn = sample_groups(
        policy, batch.input_ids, batch.attention_mask, batch.images, seeds, positions=batch.positions,
        max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, temperature=temperature, top_p=top_p,
    )  # fmt: skip
    right = [
        final_answer(prefixes[r // samples] + tokenizer.decode([t for t in row if t != tokenizer.eos_id],
                                                               skip_special_tokens=True)) == answer.strip().lower()
        for r, row in enumerate(drawn)
    ]  # fmt: skip
    scores = [sum(right[b * samples : (b + 1) * samples]) / samples for b in range(len(prefixes))]
    out, start = [], 0
    for steps in solutions:
        own, start = scores[start : start + len(steps)], start + len(steps)
        if early_stop:
            dead = next((k for k, score in enumerate(own) if score == 0), None)
            own = own if dead is None else own[: dead + 1] + [0.0] * (len(own) - dead - 1)
        out.append({"steps": list(steps), "labels": [GOOD if s > threshold else BAD for s in own], "scores": own})
    return out
