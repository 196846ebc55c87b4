"""The critic's training data on the embedded default, from a policy: steps records of multi-step shapes questions,
each with the correct solution, a corrupted one and the policy's own sampled solutions, written as jsonl with PNG
images for :class:`~lit_internvl.data.RecordsDataModule` (``python -m lit_internvl critic_data`` writes them).

VisualPRM labels its policy's samples by Monte-Carlo continuations; a shapes question has one true solution, so
here a sampled step is ``+`` exactly when the solution up to it is the true one
(:func:`~lit_internvl.data.shapes.steps.label_from_scene`, ``labels="scene"``). ``labels="monte-carlo"`` labels every
solution by VisualPRM's rule instead (:func:`~lit_internvl.inference.critic.monte_carlo_labels`: a step is ``+`` when
one of ``mc_samples`` continuations of the policy from it reaches the right final answer). Sampling the policy is
what makes the critic see the mistakes it will have to judge (answers that do not follow their own counts, say),
which the corrupted solutions alone do not show it. More training questions without sampling each add their
correct solution and some of the wrong ones a model writes when it takes one object for another or miscounts by one
(:func:`~lit_internvl.data.shapes.steps.mistakes`), so that a right and a wrong solution of the same scene differ
only in what the image shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from lit_internvl.data.collate import Collator
from lit_internvl.data.critic import split_steps
from lit_internvl.data.records import Record
from lit_internvl.data.shapes.steps import corrupted, label_from_scene, mistakes, reasoning
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.inference.best_of_n import sample_n
from lit_internvl.inference.critic import monte_carlo_labels


def write_split(policy, builder, split: str, questions: int, samples: int, temperature: float, folder: Path,
                labels: str = "scene", mc_samples: int = 8, agreement: list | None = None,
                scene_questions: int = 0, scene_mistakes: int = 2) -> Path:  # fmt: skip
    """``folder/{split}.jsonl``: per question the correct, a corrupted and ``samples`` sampled solutions (distinct),
    labelled from the scene or by Monte-Carlo continuations (``labels``; ``agreement`` collects, per step, whether
    the two labellings agree); then ``scene_questions`` more questions, each with its correct solution and
    ``scene_mistakes`` of :func:`~lit_internvl.data.shapes.steps.mistakes` (no sampling, labelled from the scene)."""
    tokenizer, world = builder.tokenizer, ShapesWorld(builder.options.tile_size, 0, split)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    with open(path, "w") as f:
        # disable=None: a bar with counts and rates on a terminal, nothing when piped
        for q in tqdm(range(questions), desc=f"{split}: sampling solutions", unit=" questions", disable=None):
            qa = reasoning(world, q)
            image = f"images/{split}_{q}.png"
            qa["image"].save(folder / image)
            record = Record("conversation", f"{split}:{q}", {"conversations": [{"from": "human", "value": qa["question"]}]},
                            [qa["image"]])  # fmt: skip
            view = builder.views[0]  # the prompt
            built = builder(record)
            prompt = Collator(tokenizer.pad_id, builder.views)([built])[view.name]
            drawn = sample_n(policy, prompt.input_ids, prompt.images, [q * samples + r for r in range(samples)], 40,
                             tokenizer.eos_id, temperature)  # fmt: skip
            texts = [
                tokenizer.decode([t for t in row if t != tokenizer.eos_id], skip_special_tokens=True) for row in drawn
            ]
            solutions = [qa["steps"], corrupted(world, q, qa)[0], *(split_steps(t) for t in texts)]
            seen, distinct = set(), []
            for steps in solutions:
                if steps and tuple(steps) not in seen:
                    seen.add(tuple(steps))
                    distinct.append(steps)
            scene = [label_from_scene(qa, steps) for steps in distinct]
            if labels == "monte-carlo":
                mc = monte_carlo_labels(policy, tokenizer, built["views"][view.name], distinct, qa["answer"], mc_samples,
                                        seed=q * 1000, max_new_tokens=40, temperature=temperature)  # fmt: skip
                written = [row["labels"] for row in mc]
                if agreement is not None:
                    agreement += [a == b for x, y in zip(written, scene) for a, b in zip(x, y)]
            else:
                written = scene
            for steps, step_labels in zip(distinct, written):
                line = {"image": image, "question": qa["question"], "steps": steps, "labels": step_labels}
                f.write(json.dumps(line) + "\n")
        for q in tqdm(range(questions, questions + scene_questions), desc=f"{split}: scene mistakes",
                      unit=" questions", disable=None):  # fmt: skip
            qa = reasoning(world, q)
            image = f"images/{split}_{q}.png"
            qa["image"].save(folder / image)
            wrong = mistakes(world, q, qa)
            wrong = random.Random(f"{split}/mistakes/{q}").sample(wrong, min(scene_mistakes, len(wrong)))
            for steps in (qa["steps"], *wrong):
                line = {
                    "image": image,
                    "question": qa["question"],
                    "steps": steps,
                    "labels": label_from_scene(qa, steps),
                }
                f.write(json.dumps(line) + "\n")
    return path
