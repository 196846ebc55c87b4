"""Answering a question about images with a VisionLanguageModel: one prompt through the sample
builder, the collator and :func:`~lit_internvl.inference.generate.generate` (``python -m lit_internvl chat``
is the command over it)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lit_internvl.data.collate import Collator
from lit_internvl.data.records import Record
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.tokenizer import IMG_CONTEXT, HFTokenizer
from lit_internvl.data.views import View
from lit_internvl.inference.generate import generate
from lit_internvl.models.vlm import VisionLanguageModel


def load_hf_chat_model(folder: str | Path) -> tuple[VisionLanguageModel, SampleBuilder]:
    """The model of a Hugging Face InternVL folder (either layout) and a prompt builder with its tokenizer,
    its tile size and its chat template (OpenGVLab's ``template``, else ``internvl2_5``)."""
    from lit_internvl.hf import load_vlm, read_config

    folder = str(folder).removeprefix("hf:")
    tokenizer = HFTokenizer(folder)
    model = load_vlm(folder, image_context_id=tokenizer.token_to_id(IMG_CONTEXT))
    template = read_config(folder, image_context_id=model.image_context_id).template or "internvl2_5"
    options = SampleOptions(tile_size=model.tile_size, template=template)
    return model, SampleBuilder(tokenizer, options, (View("prompt", model.budgets()[0]),))


def answer(
    model: VisionLanguageModel,
    builder: SampleBuilder,
    question: str,
    images: list[str] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The model's answer to ``question`` about ``images`` (paths; ``<image>`` placeholders in the
    question, or one per image in front of it), with the builder's template and tiling."""
    record = Record("conversation", "chat", {"conversations": [{"from": "human", "value": question}]}, list(images))
    tokenizer = builder.tokenizer
    batch = Collator(tokenizer.pad_id, builder.views)([builder(record)])[builder.views[0].name]
    device = next(model.parameters()).device  # the prompt goes where the model is (a GPU: lmms-eval's device)
    images = batch.images
    if images is not None:
        images = replace(images, pixel_values=images.pixel_values.to(device))
    tokens = generate(
        model, batch.input_ids.to(device), batch.attention_mask.to(device), images, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, temperature=temperature, top_p=top_p, positions=batch.positions.to(device),
        generator=torch.Generator(device).manual_seed(seed),
    )[0]  # fmt: skip
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
