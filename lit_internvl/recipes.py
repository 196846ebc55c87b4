"""Recipes in layers: what ``layers:`` in a recipe means, and the one merge that reads it.

A recipe names small layer files, paths relative to itself, and adds its own keys::

    layers:                        # recipes/internvl3_1b/mpo.yaml
      - ../stages/mpo.yaml         # the stage class and its options
      - ../models/internvl3_1b.yaml
      - ...
    model:
      init_args:
        learning_rate: 2.0e-7      # the recipe's own keys win over its layers

``--config RECIPE`` becomes ``--config LAYER_1 ... --config LAYER_n --config RECIPE`` before LightningCLI parses
(:func:`expand_configs`), so jsonargparse merges the files in that order: a later layer wins over an earlier one,
the recipe over its layers, and what follows it on the command line (``--config`` presets, ``--key value``
overrides) over all of them. A layer may name layers of its own; each file is read once, where it is first named.
Interpolations (``${trainer.default_root_dir}``) resolve on the merged config. ``run_name``, which the trainer
layers' ``default_root_dir: runs/${run_name}`` reads, is the recipe's path under ``recipes/`` without ``.yaml``
(``internvl3_1b/mpo``), or its file name outside ``recipes/``.

:func:`compose` is the same merge as one dict, for code that reads a recipe's values (tests, docs, a stage's
``critic_config``). It follows jsonargparse's rules for what recipes hold: mappings merge key by key, ``key+:``
appends to a list, two lists of ``class_path`` entries of the same length merge entry by entry (a recipe changes
one argument of its trainer layer's ``ModelCheckpoint`` by restating that entry with the argument), an entry of
another class replaces the old one, anything else replaces what was there.

Layers live in the folders of :data:`LAYER_FOLDERS`; every other YAML file under ``recipes/`` is a run
(:func:`entry_recipes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# recipes/<folder>/ holds layers, never runs.
LAYER_FOLDERS = ("models", "stages", "data", "trainers", "speed", "scripts", "strategies")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _read(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else {}


def _named_layers(path: Path, config: dict) -> list[Path]:
    layers = config.get("layers") or []
    if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"{path}: layers must be a list of YAML paths relative to the file, got {layers!r}")
    named = [(path.parent / layer).resolve() for layer in layers]
    for layer, name in zip(named, layers, strict=True):
        if not layer.is_file():
            raise FileNotFoundError(f"{path}: layer {name!r} is not a file ({layer})")
    return named


def layer_files(path: str | Path) -> list[Path]:
    """The files ``path``'s ``layers:`` name, their own layers first, each once, in the order they apply."""
    order: list[Path] = []

    def visit(file: Path, chain: tuple[Path, ...]) -> None:
        for layer in _named_layers(file, _read(file)):
            if layer in chain:
                raise ValueError(f"layers form a cycle: {' → '.join(str(p) for p in (*chain, layer))}")
            if layer not in order:
                visit(layer, (*chain, layer))
                order.append(layer)

    root = Path(path).resolve()
    visit(root, (root,))
    return order


def run_name(path: str | Path) -> str:
    """``path``'s name as a run: its path under the nearest ``recipes/`` folder without ``.yaml``, else its stem."""
    parts = Path(path).absolute().parts
    if "recipes" in parts[:-1]:
        start = len(parts) - 1 - parts[::-1].index("recipes", 1)
        return str(Path(*parts[start + 1 :]).with_suffix(""))
    return Path(path).stem


def has_layers(path: str | Path) -> bool:
    """Whether ``path`` is a YAML file with ``layers:`` (``--config`` also takes YAML text, which never has)."""
    path = Path(path)
    try:
        return path.suffix in (".yaml", ".yml") and path.is_file() and "layers" in _read(path)
    except (OSError, yaml.YAMLError):  # text too long for a file name, or not YAML: jsonargparse says so
        return False


def expand_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config RECIPE`` (or ``-c``, ``--config=``) whose file has ``layers:`` preceded by
    ``--run_name`` and a ``--config`` for each of its layers; every other argument as it was."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("-c", "--config") and i + 1 < len(argv):
            given, value = argv[i : i + 2], argv[i + 1]
        elif argv[i].startswith("--config="):
            given, value = argv[i : i + 1], argv[i].removeprefix("--config=")
        else:
            given, value = argv[i : i + 1], None
        if value is not None and has_layers(value):
            out.append(f"--run_name={run_name(value)}")
            for layer in layer_files(value):
                out += ["--config", str(layer)]
        out += given
        i += len(given)
    return out


def _is_entry(value: Any) -> bool:
    return isinstance(value, dict) and "class_path" in value


def merge(old: Any, new: Any) -> Any:
    """``new`` over ``old`` as jsonargparse merges two config files (the rules of the module docstring)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if _is_entry(old) and _is_entry(new) and old["class_path"] != new["class_path"]:
            return new
        out = dict(old)
        for key, value in new.items():
            if key.endswith("+"):
                key = key[:-1]
                out[key] = [*(out.get(key) or []), *(value if isinstance(value, list) else [value])]
            else:
                out[key] = merge(out[key], value) if key in out else value
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(map(_is_entry, old + new)):
        return [merge(a, b) for a, b in zip(old, new, strict=True)]
    return new


def compose(path: str | Path) -> dict:
    """The config ``--config path`` gives before interpolation: its layers and itself merged, ``layers`` dropped,
    ``run_name`` set when it has layers."""
    path = Path(path)
    config = _read(path)
    merged: dict = {"run_name": run_name(path)} if "layers" in config else {}
    for file in [*layer_files(path), path]:
        merged = merge(merged, {k: v for k, v in _read(file).items() if k != "layers"})
    return merged


def entry_recipes(root: str | Path = RECIPES) -> list[Path]:
    """Every run under ``root`` (a recipes folder): its YAML files outside the layer folders, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.yaml") if not set(p.relative_to(root).parts[:-1]) & set(LAYER_FOLDERS))


def stage_of_recipe(path: str | Path):
    """The stage of ``path``'s ``model:`` section (layers included, :func:`compose`), ``init_from`` unread: what
    builds a critic trained with another architecture than the policy it judges. The one place outside the CLI
    where a recipe becomes objects; stages call it and hold no parser of their own."""
    import lightning as L
    from jsonargparse import ArgumentParser

    from lit_internvl.deprecations import upgrade_config

    model = upgrade_config(compose(path))["model"]
    model.setdefault("init_args", {})["init_from"] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    return parser.instantiate_classes(parser.parse_object({"model": model})).model
