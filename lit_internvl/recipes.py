"""Reading a recipe outside a Trainer run: the stage its ``model:`` section describes (a critic trained with another
architecture than the policy it judges). The one place outside the CLI where YAML becomes objects; stages call it,
they hold no parser of their own."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def recipe_config(path: str | Path) -> dict:
    """A recipe's configuration as a dict."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def stage_of_recipe(path: str | Path) -> L.LightningModule:
    """The stage of ``path``'s ``model:`` section (its ``class_path`` and ``init_args``), ``init_from`` unread."""
    from jsonargparse import ArgumentParser

    model = recipe_config(path)["model"]
    model.setdefault("init_args", {})["init_from"] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    return parser.instantiate_classes(parser.parse_object({"model": model})).model
