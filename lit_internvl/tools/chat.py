"""``python -m lit_internvl chat``: answer a question about an image with a trained model.

    python -m lit_internvl chat --config recipes/sft.yaml --checkpoint runs/sft/checkpoints/last.ckpt \\
        --image photo.png "What colour is the square?"
    python -m lit_internvl chat --checkpoint hf:/path/to/InternVL3-1B --image photo.jpg "Describe the image."

With a recipe, the model and the data settings (tokenizer, template, tiling) come from it and the
weights from the Lightning checkpoint; with ``hf:`` everything comes from the checkpoint folder.
"""

from __future__ import annotations

import argparse

from lit_internvl.checkpoints import read_state_dict
from lit_internvl.inference import answer, load_hf_chat_model


def load_from_recipe(config: str, checkpoint: str):
    """→ (model, prompt builder): the recipe's stage built for the recipe's data, with the checkpoint's weights."""
    from lit_internvl.cli import main as cli_main

    cli = cli_main(["--config", config, "--model.init_args.init_from", "null"], run=False)
    stage = cli.model.use_data(cli.datamodule)
    stage.configure_model()
    stage.model.load_state_dict(read_state_dict(checkpoint))
    return stage.model, cli.datamodule.sample_builder(generation=True)


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="python -m lit_internvl chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--checkpoint", required=True, help="a Lightning .ckpt (with --config) or hf:/folder")
    parser.add_argument("--config", help="the recipe the checkpoint was trained with")
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.checkpoint.startswith("hf:"):
        model, builder = load_hf_chat_model(args.checkpoint)
    elif args.config is None:
        parser.error("--config RECIPE.yaml is needed with a Lightning checkpoint (it says how to build the model)")
    else:
        model, builder = load_from_recipe(args.config, args.checkpoint)
    text = answer(model.eval(), builder, args.question, args.image, args.max_new_tokens, args.temperature, args.top_p)
    print(text, flush=True)
    return text
