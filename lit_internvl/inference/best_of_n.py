"""Best-of-N (VisualPRM): sample N answers in one batch, score every step of each with a critic, keep the best.

::

    prompt ─► embed (vision tower once) ─► prefill (1 row) ─► KV cache copied to N rows ─► N answers
                                                          each row drawn with its own seeded generator
    N answers ─► split on blank lines ─► critic, one forward over N conversations ─► P(+) per step
              ─► aggregate (mean) ─► the best answer;  majority vote over final answers as the baseline

Row ``r`` of :func:`sample_n` draws with ``torch.Generator().manual_seed(seeds[r])`` from its own logits, so it
is the answer :func:`~lit_internvl.inference.generate.generate` gives for the prompt alone with that generator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from lit_internvl.batch import Batch, Images
from lit_internvl.data.critic import split_steps
from lit_internvl.data.samples import SampleOptions
from lit_internvl.inference.critic import Aggregate, aggregate, score_solutions
from lit_internvl.inference.rollout import sample_groups
from lit_internvl.rewards import final_answer


def sample_n(
    model,
    input_ids: torch.Tensor,
    images: Images | torch.Tensor | None,
    seeds: Sequence[int],
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    positions: torch.Tensor | None = None,
) -> list[list[int]]:
    """``len(seeds)`` continuations of one prompt ``input_ids (1, T)`` (no padding) in one batch: the image
    features and the prompt's keys and values computed once and shared, each row drawn with its own generator
    (``seeds[r]``) and stopped at ``eos_id`` (included) — :func:`~lit_internvl.inference.rollout.sample_groups`
    with one prompt. (Final answers: :func:`lit_internvl.rewards.final_answer`.)"""
    if input_ids.shape[0] != 1:
        raise ValueError(f"sample_n continues one prompt; got {input_ids.shape[0]} rows")
    return sample_groups(
        model, input_ids, torch.ones_like(input_ids), images, seeds, positions=positions,
        max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, top_p=top_p,
    )  # fmt: skip


def majority_vote(responses: Sequence[str]) -> int:
    """The index of the first response whose final answer is the most common (self-consistency); ties go to the
    answer met first."""
    finals = [final_answer(r) for r in responses]
    winner = Counter(finals).most_common(1)[0][0]
    return finals.index(winner)


def best_of_n(
    policy,
    tokenizer,
    prompt: dict,
    question: str,
    critic,
    critic_tokenizer,
    critic_options: SampleOptions,
    critic_pixel_values: torch.Tensor | None,
    n: int = 8,
    seed: int = 0,
    how: Aggregate = "mean",
    **sampling,
) -> dict:
    """N answers of ``policy`` to ``prompt`` (a collated one-row batch), each scored by ``critic`` step by step.

    ``question`` is what the critic reads after ``### Question:`` and ``critic_pixel_values`` its tiles of the
    image (its own tiling); ``sampling``: :func:`sample_n`'s ``max_new_tokens``, ``temperature``, ``top_p``. Seeds
    are ``seed, seed + 1, ...``. Returns ``{"answer", "best", "majority", "majority_answer", "candidates":
    [{"answer", "final", "step_scores", "score", "finished"}]}``: the best-scored answer (the first on a tie) and the baseline.
    """
    seeds = [seed + r for r in range(n)]
    tokens = sample_n(
        policy, prompt["input_ids"], prompt.get("images"), seeds, eos_id=tokenizer.eos_id,
        positions=prompt.get("positions"), **sampling,
    )  # fmt: skip
    texts = [tokenizer.decode([t for t in row if t != tokenizer.eos_id], skip_special_tokens=True) for row in tokens]
    steps = [split_steps(text) for text in texts]
    scores = score_solutions(critic, critic_tokenizer, critic_options, question, steps, critic_pixel_values)
    candidates = []
    for text, ids, row, row_scores in zip(texts, tokens, steps, scores):
        row_scores = row_scores if row else []  # an empty answer was scored as one empty step: it has none
        candidates.append({"answer": text, "final": final_answer(text), "step_scores": row_scores,
                           "score": aggregate(row_scores, how), "finished": tokenizer.eos_id in ids})  # fmt: skip
    best = max(range(n), key=lambda r: (candidates[r]["score"], -r))
    majority = majority_vote(texts)
    return {"answer": texts[best], "best": best, "majority": majority, "majority_answer": texts[majority],
            "candidates": candidates}  # fmt: skip


def best_of_n_rows(policy, tokenizer, batch: Batch, critic, critic_options: SampleOptions, **options) -> list[dict]:
    """:func:`best_of_n` for each prompt of a collated ``prompt`` batch (left-padded), the critic reading the
    prompt's own tiles and ``meta["question"]``; ``options``: :func:`best_of_n`'s. Returns per prompt
    ``{"name", "reference", "meta", **best_of_n(...)}``."""
    out = []
    for row, name in enumerate(batch.sample_names):
        meta = (batch.meta or [None] * batch.rows)[row] or {}
        if "question" not in meta:
            raise ValueError(
                f"{name}: model.init_args.generation.best_of needs the prompt's question in meta['question']"
            )
        real = batch.attention_mask[row] == 1  # the prompt without its left padding
        images = batch.images.select([row]) if batch.images is not None else None
        prompt = {"input_ids": batch.input_ids[row][real][None], "images": images}
        pixels = None if images is None else images.pixel_values
        result = best_of_n(policy, tokenizer, prompt, meta["question"], critic, tokenizer, critic_options, pixels,
                           **options)  # fmt: skip
        reference = (batch.reference or [None] * batch.rows)[row]
        out.append({"name": name, "reference": reference, "meta": meta, **result})
    return out
