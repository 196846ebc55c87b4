"""Helpers for tests that build a shipped recipe's stage without its weights."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from lit_internvl.recipes import compose


def stage_on_meta(recipe: str | Path):
    """The stage of ``recipe``'s ``model`` section (its layers composed), ``init_from`` dropped, its model built on
    the meta device. With no tokenizer to read ``<IMG_CONTEXT>``'s id from, the id is a placeholder (0) unless the
    recipe sets one: it changes no parameter."""
    from jsonargparse import ArgumentParser

    from lit_internvl.stages.base import Stage
    from lit_internvl.stages.vision_language import VisionLanguageStage

    model_config = compose(recipe)["model"]
    model_config["init_args"]["init_from"] = None
    module, _, name = model_config["class_path"].rpartition(".")
    if issubclass(getattr(importlib.import_module(module), name), VisionLanguageStage):
        model_config["init_args"].setdefault("image_context_id", 0)
    parser = ArgumentParser()
    parser.add_subclass_arguments(Stage, "model")
    stage = parser.instantiate_classes(parser.parse_object({"model": model_config})).model
    with torch.device("meta"):
        stage.configure_model()
    return stage
