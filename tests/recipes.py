"""Helpers for tests that build a shipped recipe's stage without its weights."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def stage_on_meta(recipe: str | Path):
    """The stage of ``recipe``'s ``model`` section, ``init_from`` dropped, its model built on the meta device."""
    from jsonargparse import ArgumentParser

    from lit_internvl.stages.base import Stage

    model_config = yaml.safe_load(Path(recipe).read_text())["model"]
    model_config["init_args"]["init_from"] = None
    parser = ArgumentParser()
    parser.add_subclass_arguments(Stage, "model")
    stage = parser.instantiate_classes(parser.parse_object({"model": model_config})).model
    with torch.device("meta"):
        stage.configure_model()
    return stage
