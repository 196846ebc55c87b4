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

from lit_internvl.components.language import KVCache
from lit_internvl.data.critic import split_steps
from lit_internvl.data.samples import SampleOptions
from lit_internvl.inference.critic import Aggregate, aggregate, score_solutions
from lit_internvl.inference.generate import sample_next

ANSWER_PREFIX = "Answer:"


@torch.no_grad()
def sample_n(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    tiles_per_sample: list[int] | None,
    seeds: Sequence[int],
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """``len(seeds)`` continuations of one prompt ``input_ids (1, T)`` (no padding) in one batch.

    The image features and the prompt's keys and values are computed once, for one row, and shared by the N
    rows; each row then samples with its own generator (``seeds[r]``) and stops at ``eos_id`` (included).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"sample_n continues one prompt; got {input_ids.shape[0]} rows")
    n, device, decoder = len(seeds), input_ids.device, model.decoder
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    embeds = model.embed(input_ids, pixel_values, tiles_per_sample)  # (1, T, D): the vision tower runs here, once
    cache = KVCache(len(decoder.layers))
    mask = torch.ones_like(input_ids)
    positions = torch.arange(input_ids.shape[1], device=device, dtype=torch.float32)[None]
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, positions=positions, cache=cache)
    logits = decoder.head(hidden[:, -1]).expand(n, -1)  # (N, V), the same first distribution for every row
    cache.select(torch.zeros(n, dtype=torch.long, device=device))  # the prompt's keys and values, N times
    mask, positions = mask.expand(n, -1), positions.expand(n, -1)
    out: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    for _ in range(max_new_tokens):
        token = torch.full((n,), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
        for r in range(n):  # row by row: each draw consumes only its own generator, as a lone run would
            if not finished[r]:
                token[r] = sample_next(logits[r : r + 1], temperature, top_p, generators[r])[0]
                out[r].append(int(token[r]))
                finished[r] = eos_id is not None and out[r][-1] == eos_id
        if all(finished):
            break
        next_position = positions[:, -1:] + 1
        positions = torch.cat((positions, next_position), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        next_embed = decoder.embed_tokens(token[:, None]).to(embeds.dtype)
        hidden = decoder(inputs_embeds=next_embed, attention_mask=mask, positions=next_position, cache=cache)
        logits = decoder.head(hidden[:, -1])
    return out


def final_answer(response: str) -> str:
    """The final answer of a step-by-step response: its last step, less a leading ``Answer:`` (VisualPRM's
    prompts ask for ``Final answer: ..``; the shapes world writes ``Answer: ...``), lower-cased, trimmed."""
    steps = split_steps(response)
    last = steps[-1] if steps else ""
    if ANSWER_PREFIX.lower() in last.lower():
        last = last[last.lower().rindex(ANSWER_PREFIX.lower()) + len(ANSWER_PREFIX) :]
    return last.strip().rstrip(".").strip().lower()


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
        policy, prompt["input_ids"], prompt["pixel_values"], prompt["tiles_per_sample"], seeds,
        eos_id=tokenizer.eos_id, **sampling,
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
