"""Best-of-N with a process-reward critic on held-out multi-step shapes questions: one table of accuracy for greedy
decoding, majority vote over N samples, Best-of-N by the critic and the oracle (any of the N right), each with its
wall time, and the critic's step accuracy beside its chance level; then, as every row answers the same questions,
the paired comparisons (majority vote against greedy, each Best-of-N against the vote) with McNemar's exact test.

    python benchmarks/best_of_n.py --policy runs/sft_steps/checkpoints/last.ckpt \\
        --critic runs/critic/checkpoints/last.ckpt --questions 1000 --n 8 [--temperature 0.5]

The policy is recipes/sft_steps.yaml's model, the critic recipes/critic.yaml's (``--policy-config``,
``--critic-config``). Questions are the test split of lit_internvl.data.shapes.steps (never trained on); a
question is right when the final answer (``Answer: ...``) equals the scene's. The N samples of a question are one
batched generation (lit_internvl.inference.best_of_n.sample_n, seeds ``seed + q·N + r``), shared by the majority
vote, Best-of-N and the oracle: their times are the sampling's, Best-of-N's plus the critic's scoring.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter, defaultdict

import torch

from lit_internvl.data.collate import Collator
from lit_internvl.data.critic import label_ids, split_steps
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.shapes.steps import ShapesSteps, label_from_scene, reasoning
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.data.views import View
from lit_internvl.inference import generate
from lit_internvl.inference.best_of_n import majority_vote, sample_n
from lit_internvl.inference.critic import AGGREGATES, aggregate, score_solutions, score_steps
from lit_internvl.rewards import final_answer
from lit_internvl.tools.chat import load_from_recipe


def step_accuracy(critic, builder, world: ShapesWorld, samples: int, batch_size: int = 32) -> tuple[float, float]:
    """The critic's step accuracy (P(+) > 0.5 against the scene's labels) on ``samples`` held-out step records,
    and its chance level (the share of the more common label)."""
    plus_id, minus_id = label_ids(builder.tokenizer)
    dataset = ShapesSteps(world, samples, builder)
    collate = Collator(builder.tokenizer.pad_id, builder.views)
    right = total = good = 0
    for start in range(0, samples, batch_size):
        views = collate([dataset[i] for i in range(start, min(start + batch_size, samples))])
        batch = views[builder.views[0].name]
        for meta, row in zip(batch.meta, score_steps(critic, batch, plus_id, minus_id)):
            labels = [label == "+" for label in meta["labels"]]
            right += sum((p > 0.5) == label for p, label in zip(row, labels))
            total, good = total + len(labels), good + sum(labels)
    return right / total, max(good, total - good) / total


def paired(a: list[bool], b: list[bool]) -> dict:
    """Method a against method b on the same questions: the questions only a gets right (``wins``), only b
    (``losses``), and the exact two-sided sign test's p-value on those discordant questions (McNemar's exact test:
    under "neither is better" each discordant question is a fair coin)."""
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    n, k = wins + losses, min(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"wins": wins, "losses": losses, "p": p}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="the policy's .ckpt")
    parser.add_argument("--critic", required=True, help="the critic's .ckpt")
    parser.add_argument("--policy-config", default="recipes/sft_steps.yaml")
    parser.add_argument("--critic-config", default="recipes/critic.yaml")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--step-samples", type=int, default=400, help="held-out step records for the step accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    policy, builder = load_from_recipe(args.policy_config, args.policy)
    critic, critic_builder = load_from_recipe(args.critic_config, args.critic)
    policy.eval(), critic.eval()
    # The step records as the critic trained on them (the conversation view at the budget its prompts have).
    critic_budget = critic_builder.views[0].budget
    critic_train_builder = SampleBuilder(
        critic_builder.tokenizer, critic_builder.options, (View("conversation", critic_budget),)
    )
    tokenizer, tile = builder.tokenizer, builder.options.tile_size
    collate_prompt = Collator(tokenizer.pad_id, builder.views)  # the prompt view: left-padded
    world = ShapesWorld(tile, 0, "test")
    outcomes = defaultdict(list)  # method → right or not, per question (accuracies and the paired comparisons)
    right = Counter()  # (method, type) → questions of that type right
    seconds = Counter()
    kinds = Counter()
    policy_steps = Counter()  # the critic on the policy's samples: steps, steps judged right, steps labelled +
    for q in range(args.questions):
        qa = reasoning(world, q)
        kinds[qa["type"]] += 1
        record = Record("conversation", f"test:{q}", {"conversations": [{"from": "human", "value": qa["question"]}]},
                        [qa["image"]])  # fmt: skip
        prompt = collate_prompt([builder(record)])[builder.views[0].name]

        def text(tokens: list[int]) -> str:
            return tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)

        start = time.perf_counter()
        greedy = generate(policy, prompt.input_ids, prompt.attention_mask, prompt.images,
                          max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id)[0]  # fmt: skip
        seconds["greedy"] += time.perf_counter() - start
        ok = {"greedy": final_answer(text(greedy)) == qa["answer"]}

        start = time.perf_counter()
        seeds = [args.seed + q * args.n + r for r in range(args.n)]
        samples = sample_n(policy, prompt.input_ids, prompt.images, seeds, args.max_new_tokens, tokenizer.eos_id,
                           args.temperature)  # fmt: skip
        sampled = time.perf_counter() - start
        texts = [text(tokens) for tokens in samples]
        finals = [final_answer(t) for t in texts]
        ok["majority"] = finals[majority_vote(texts)] == qa["answer"]
        ok["oracle"] = qa["answer"] in finals

        start = time.perf_counter()
        critic_pixels = critic_builder(record)["views"][critic_builder.views[0].name]["pixel_values"]
        steps = [split_steps(t) for t in texts]
        scores = score_solutions(critic, critic_builder.tokenizer, critic_builder.options, qa["question"], steps,
                                 critic_pixels)  # fmt: skip
        scored = time.perf_counter() - start
        for how in AGGREGATES:
            totals = [aggregate(row if solution else [], how) for solution, row in zip(steps, scores)]
            best = max(range(args.n), key=lambda r: (totals[r], -r))
            ok[f"best_of/{how}"] = finals[best] == qa["answer"]
            seconds[f"best_of/{how}"] += sampled + scored
        for key, value in ok.items():
            outcomes[key].append(value)
            right[key, qa["type"]] += value
        for solution, row in zip(steps, scores):
            for label, p in zip(label_from_scene(qa, solution), row if solution else []):
                policy_steps["steps"] += 1
                policy_steps["right"] += (p > 0.5) == (label == "+")
                policy_steps["good"] += label == "+"
        seconds["majority"] += sampled
        seconds["oracle"] += sampled

    start = time.perf_counter()
    accuracy, chance = step_accuracy(critic, critic_train_builder, ShapesWorld(tile, 0, "test"), args.step_samples)
    step_seconds = time.perf_counter() - start
    n = args.questions
    accuracies = {key: sum(outcomes[key]) / n for key in outcomes}
    rows = {"greedy": "greedy", "majority": f"majority vote @{args.n}",
            **{f"best_of/{how}": f"Best-of-{args.n} (critic, {how} of the steps' P(+))" for how in AGGREGATES},
            "oracle": f"oracle @{args.n}"}  # fmt: skip
    print(f"{n} held-out questions ({dict(kinds)}), {args.n} samples each at temperature {args.temperature}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    types = sorted(kinds)
    print(f"| method | accuracy | {' | '.join(types)} | wall time (s) |\n|---|---|{'---|' * len(types)}---|")
    for key, name in rows.items():
        per_type = " | ".join(f"{right[key, kind] / kinds[kind]:.3f}" for kind in types)
        print(f"| {name} | {accuracies[key]:.3f} | {per_type} | {seconds[key]:.1f} |")
    blank = " |" * len(types)
    print(f"| critic step accuracy ({args.step_samples} held-out correct and corrupted solutions) | {accuracy:.3f} "
          f"(chance {chance:.3f}) |{blank} {step_seconds:.1f} |")  # fmt: skip
    share = policy_steps["good"] / max(policy_steps["steps"], 1)
    on_samples = policy_steps["right"] / max(policy_steps["steps"], 1)
    print(f"| critic step accuracy ({policy_steps['steps']} steps of the policy's samples above, scene labels) | "
          f"{on_samples:.3f} (chance {max(share, 1 - share):.3f}) |{blank} (in Best-of) |")  # fmt: skip
    print(f"greedy wrong on {1 - accuracies['greedy']:.1%} of the questions")
    pairs = {(a, b): paired(outcomes[a], outcomes[b])
             for a, b in [("majority", "greedy"), *((f"best_of/{how}", "majority") for how in AGGREGATES)]}  # fmt: skip
    print("\n| paired, same questions | right only by the first | right only by the second | sign test p |")
    print("|---|---|---|---|")
    for (a, b), pair in pairs.items():
        print(f"| {rows[a]} vs {rows[b]} | {pair['wins']} | {pair['losses']} | {pair['p']:.3g} |")
    return {"accuracy": {k: accuracies[k] for k in rows}, "seconds": dict(seconds), "step_accuracy": accuracy,
            "step_chance": chance, "policy_step_accuracy": on_samples, "policy_step_chance": max(share, 1 - share),
            "paired": {f"{a} vs {b}": pair for (a, b), pair in pairs.items()}}  # fmt: skip


if __name__ == "__main__":
    main()
