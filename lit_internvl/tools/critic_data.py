"""``python -m lit_internvl critic_data``: the critic's training data on the embedded default, written from the
policy's own samples (:mod:`lit_internvl.inference.critic_data`), as jsonl with PNG images for RecordsDataModule.

    python -m lit_internvl critic_data --policy runs/sft_steps/checkpoints/last.ckpt --output runs/critic_data

Per training question the correct solution, a corrupted one and ``--samples`` of the policy's, every step labelled
from the scene (``--labels scene``) or by VisualPRM's Monte-Carlo rule (``--labels monte-carlo``, which also prints
how often the two labellings agree); then ``--scene-questions`` more (no sampling, seconds), each with its correct
solution and ``--mistakes`` wrong ones. Train and validation come from the world's train and val splits
(validation: sampled questions only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_internvl.inference.critic_data import write_split
from lit_internvl.tools.chat import load_from_recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl critic_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="the policy's .ckpt")
    parser.add_argument("--policy-config", default="recipes/sft_steps.yaml")
    parser.add_argument("--output", default="runs/critic_data")
    parser.add_argument("--train-questions", type=int, default=2000)
    parser.add_argument("--val-questions", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4, help="policy samples per question")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--labels", choices=("scene", "monte-carlo"), default="scene")
    parser.add_argument("--mc-samples", type=int, default=8, help="continuations a step prefix (monte-carlo)")
    parser.add_argument(
        "--scene-questions",
        type=int,
        default=8000,
        help="more training questions, each with its correct solution and --mistakes wrong ones",
    )
    parser.add_argument("--mistakes", type=int, default=2, help="wrong solutions a --scene-questions question")
    args = parser.parse_args(argv)
    policy, builder = load_from_recipe(args.policy_config, args.policy)
    policy.eval()
    for split, count in (("train", args.train_questions), ("val", args.val_questions)):
        agreement: list[bool] = []
        path = write_split(policy, builder, split, count, args.samples, args.temperature, Path(args.output),
                           args.labels, args.mc_samples, agreement,
                           args.scene_questions if split == "train" else 0, args.mistakes)  # fmt: skip
        print(f"{path}: {sum(1 for _ in open(path))} steps records", flush=True)
        if agreement:
            print(f"{split}: Monte-Carlo and scene labels agree on {sum(agreement) / len(agreement):.3f} of "
                  f"{len(agreement)} steps", flush=True)  # fmt: skip
