"""``python -m lit_internvl chat``: answer a question about an image with a trained model.

    python -m lit_internvl chat --config recipes/sft.yaml --checkpoint runs/sft/checkpoints/last.ckpt \\
        --image photo.png "What colour is the square?"
    python -m lit_internvl chat --checkpoint hf:/path/to/InternVL3-1B --image photo.jpg "Describe the image."
    python -m lit_internvl chat --config recipes/sft_steps.yaml --checkpoint runs/sft_steps/checkpoints/last.ckpt \
        --best-of 8 --critic runs/critic/checkpoints/last.ckpt --image scene.png "Are there more red or blue objects?"

With a recipe, the model and the data settings (tokenizer, template, tiling) come from it and the
weights from the Lightning checkpoint; with ``hf:`` everything comes from the checkpoint folder.
``--best-of N --critic CKPT`` samples N answers (one batch) and prints the one the critic scores best
(:mod:`lit_internvl.inference.best_of_n`); every candidate, its step scores and the majority vote go to stderr.
The critic is ``hf:/folder``, or a ``.ckpt`` built by ``--critic-config`` (default: ``--config``).
"""

from __future__ import annotations

import argparse
import sys

from lit_internvl.checkpoints import read_state_dict
from lit_internvl.data.collate import Collator
from lit_internvl.data.records import Record
from lit_internvl.inference import answer, load_hf_chat_model
from lit_internvl.inference.best_of_n import best_of_n


def load_from_recipe(config: str, checkpoint: str):
    """→ (model, prompt builder): the recipe's stage built for the recipe's data, with the checkpoint's weights."""
    from lit_internvl.cli import main as cli_main

    cli = cli_main(["--config", config, "--model.init_args.init_from", "null"], run=False)
    stage = cli.model.use_data(cli.datamodule)
    stage.configure_model()
    # The model's tensors; a stage's own state beside them (MPO's running δ, ViR's window of ratios) is not the model's.
    own = tuple(f"{name}." for name, _ in stage.model.named_children())
    stage.model.load_state_dict({k: v for k, v in read_state_dict(checkpoint).items() if k.startswith(own)})
    return stage.model, cli.datamodule.sample_builder(views=cli.datamodule.prompt_views())


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt (with --config) or hf:/folder")
    parser.add_argument("--config", help="the recipe the checkpoint was trained with")
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--best-of", type=int, default=1, help="sample N answers and keep the critic's best")
    parser.add_argument("--critic", help="the critic of --best-of: a Lightning .ckpt or hf:/folder")
    parser.add_argument("--critic-config", help="the recipe the critic .ckpt was trained with (default: --config)")
    parser.add_argument("--seed", type=int, default=0, help="the first of the N samples' seeds")
    args = parser.parse_args(argv)

    def load(checkpoint: str, config: str | None, option: str):
        if checkpoint.startswith("hf:"):
            return load_hf_chat_model(checkpoint)
        if config is None:
            parser.error(
                f"{option} is a Lightning checkpoint: --config RECIPE.yaml is needed (it says how to build it)"
            )
        return load_from_recipe(config, checkpoint)

    model, builder = load(args.checkpoint, args.config, "--checkpoint")
    if args.best_of > 1:
        if args.critic is None:
            parser.error("--best-of needs --critic CKPT to score the answers")
        critic, critic_builder = load(args.critic, args.critic_config or args.config, "--critic")
        return _best_of(args, model.eval(), builder, critic.eval(), critic_builder)
    text = answer(model.eval(), builder, args.question, args.image, args.max_new_tokens, args.temperature, args.top_p)
    print(text, flush=True)
    return text


def _best_of(args, model, builder, critic, critic_builder) -> str:
    """Best-of-N: the prompt through the policy's builder, the image through the critic's (its own tiling)."""
    record = Record("conversation", "chat", {"conversations": [{"from": "human", "value": args.question}]}, args.image)
    batch = Collator(builder.tokenizer.pad_id, builder.views)([builder(record)])[builder.views[0].name]
    prompt = {"input_ids": batch.input_ids, "images": batch.images, "positions": batch.positions}
    critic_pixels = critic_builder(record)["views"][critic_builder.views[0].name]["pixel_values"]
    result = best_of_n(
        model, builder.tokenizer, prompt, args.question, critic, critic_builder.tokenizer, critic_builder.options,
        critic_pixels, n=args.best_of, seed=args.seed, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature or 1.0, top_p=args.top_p,
    )  # fmt: skip
    for i, candidate in enumerate(result["candidates"]):
        steps = " ".join(f"{s:.3f}" for s in candidate["step_scores"])
        print(
            f"candidate {i}: score {candidate['score']:.3f} (steps {steps}): {candidate['answer']!r}", file=sys.stderr
        )
    print(f"majority vote: candidate {result['majority']}; critic's best: candidate {result['best']}", file=sys.stderr)
    print(result["answer"], flush=True)
    return result["answer"]
