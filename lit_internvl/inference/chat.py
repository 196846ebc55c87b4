"""``python -m lit_internvl chat``: answer a question about an image with a trained model.

    python -m lit_internvl chat --config recipes/sft.yaml --checkpoint runs/sft/checkpoints/last.ckpt \\
        --image photo.png "What colour is the square?"
    python -m lit_internvl chat --checkpoint hf:/path/to/InternVL3-1B --image photo.jpg "Describe the image."

With a recipe, the model and the data settings (tokenizer, template, tiling) come from it and the
weights from the Lightning checkpoint; with ``hf:`` everything comes from the checkpoint folder.
"""

from __future__ import annotations

import argparse

import torch

from lit_internvl.data.collate import Collator
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.inference.generate import generate


def load_for_chat(checkpoint: str, config: str | None):
    """→ (model, sample builder for prompts) from a recipe + Lightning checkpoint, or an ``hf:`` folder."""
    if checkpoint.startswith("hf:"):
        from lit_internvl.hf import load_tokenizer, load_vlm

        tokenizer = load_tokenizer(checkpoint[3:])
        model = load_vlm(checkpoint[3:], image_context_id=tokenizer.token_to_id(IMG_CONTEXT))
        builder = SampleBuilder(tokenizer, SampleOptions(model.tokens_per_tile, tile_size=model.vision.config.image_size), True)
        return model, builder
    if config is None:
        raise ValueError("--config RECIPE.yaml is needed with a Lightning checkpoint (it says how to build the model)")
    from lit_internvl.checkpoints import read_state_dict
    from lit_internvl.cli import main as cli_main

    cli = cli_main(["--config", config, "--model.init_args.init_from", "null"], run=False)
    stage, datamodule = cli.model, cli.datamodule
    stage.hparams.image_context_id = datamodule.tokenizer.token_to_id(IMG_CONTEXT)
    stage.configure_model()
    stage.model.load_state_dict(read_state_dict(checkpoint))
    return stage.model, datamodule.sample_builder(generation=True)


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

    model, builder = load_for_chat(args.checkpoint, args.config)
    model.eval()
    record = Record("conversation", "chat", {"conversations": [{"from": "human", "value": args.question}]}, list(args.image))
    batch = Collator(builder.tokenizer.pad_id, left_pad=True)([builder(record)])
    tokens = generate(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["tiles_per_sample"],
        max_new_tokens=args.max_new_tokens, eos_id=builder.tokenizer.eos_id, temperature=args.temperature,
        top_p=args.top_p, generator=torch.Generator().manual_seed(0),
    )[0]  # fmt: skip
    answer = builder.tokenizer.decode([t for t in tokens if t != builder.tokenizer.eos_id], skip_special_tokens=True)
    print(answer, flush=True)
    return answer
