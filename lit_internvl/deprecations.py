"""YAML keys that were renamed or dropped: older configs and command lines still run, with one warning per key
that names the key to use now.

Each deprecation is one line of :data:`DEPRECATIONS`, naming the class whose ``init_args`` held the key (a base
class covers its subclasses; a dotted new name moves the key into a block of options)::

    renamed("lit_internvl.stages.dual_encoder.DualEncoderStage", "image_encoder", "vision"),
    renamed("lit_internvl.data.ShapesDataModule", "task", "records", values={"pairs": "captions"}),
    dropped("lit_internvl.data.ShapesDataModule", "tokens_per_tile", "the model tells the data its budgets"),

An entry applies wherever that class is chosen by ``class_path`` (``model``, ``data``, a tower inside the model, a
trainer callback), in a ``--config`` file or on the command line (``--model.init_args.image_encoder.init_args.config
tiny``, ``--model.image_encoder ...``), the class being the last one the arguments before it chose for that key.
:func:`upgrade` rewrites the arguments before LightningCLI parses them: a config file that holds an old key is
passed on as its upgraded YAML text, a command-line key under its new name.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from jsonargparse import get_loader
from lightning.pytorch.utilities import rank_zero_warn


@dataclass(frozen=True)
class Deprecation:
    """``key`` of ``owner``'s ``init_args`` became ``new`` (its values mapped by ``values``, others kept), or, with
    ``new`` None, is no longer read (``reason`` says why)."""

    owner: str
    key: str
    new: str | None
    values: dict[Any, Any] = field(default_factory=dict)
    reason: str = ""


def renamed(owner: str, key: str, new: str, values: dict[Any, Any] | None = None) -> Deprecation:
    return Deprecation(owner, key, new, values or {})


def dropped(owner: str, key: str, reason: str) -> Deprecation:
    return Deprecation(owner, key, None, reason=reason)


_BUDGETS = "the model tells the data its visual budgets in the handshake"
_VLM_STAGE = "lit_internvl.stages.vision_language.VisionLanguageStage"
_SPEED = ("head_chunk_size", "head_backend", "compile_blocks", "fuse_projections", "length_multiple")
_GENERATION = ("max_new_tokens", "temperature", "top_p", "best_of", "critic", "critic_config", "critic_aggregate")
DEPRECATIONS: tuple[Deprecation, ...] = (
    renamed("lit_internvl.stages.dual_encoder.DualEncoderStage", "image_encoder", "vision"),
    # The data no longer decides what a sample is: the stage's views do; the shapes worlds say which records.
    renamed("lit_internvl.data.shapes.steps.ShapesStepsDataModule", "task", "records", values={"prompts": "solutions"}),
    renamed(
        "lit_internvl.data.ShapesDataModule",
        "task",
        "records",
        values={"pairs": "captions", "vqa": "questions", "nmp": "documents", "prompts": "questions"},
    ),  # fmt: skip
    dropped("lit_internvl.data.RecordsDataModule", "task", "the stage says what a sample is (its views)"),
    dropped("lit_internvl.data.ShapesDataModule", "tokens_per_tile", _BUDGETS),
    dropped("lit_internvl.data.RecordsDataModule", "tokens_per_tile", _BUDGETS),
    # A stage's `train` (the parts that train) beside a datamodule's `train` (its sources): one meaning a name.
    renamed(_VLM_STAGE, "train", "trainable"),
    # The vision-language stage's options in typed blocks (lit_internvl.stages.options).
    *(renamed(_VLM_STAGE, key, f"speed.{key}") for key in _SPEED),
    *(renamed(_VLM_STAGE, key, f"generation.{key}") for key in _GENERATION),
)


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def _is_a(class_path: Any, owner: str) -> bool:
    """Whether ``class_path`` (dotted, or a bare class name as jsonargparse accepts for subclasses) names ``owner``
    or a subclass of it."""
    base = _import(owner)
    if base is None or not isinstance(class_path, str):
        return False
    if "." not in class_path:
        return any(cls.__name__ == class_path for cls in _subclasses(base))
    cls = _import(class_path)
    return cls is not None and issubclass(cls, base)


def _mapped(deprecation: Deprecation, value: Any) -> Any:
    try:
        return deprecation.values.get(value, value)
    except TypeError:  # unhashable: a list or a dict is never mapped
        return value


class _Upgrade:
    """One pass over a command line: the class each key holds so far, and the warnings to give."""

    def __init__(self, table: tuple[Deprecation, ...]) -> None:
        self.table = table
        self.classes: dict[str, Any] = {}  # "model", "model.init_args.vision", ... → its class_path
        self.notes: dict[str, None] = {}  # the warnings, once each, in order

    def deprecation(self, path: str, key: str) -> Deprecation | None:
        """The entry for ``key`` of the ``init_args`` of the class at ``path``, if any."""
        if path not in self.classes:
            return None
        return next((d for d in self.table if d.key == key and _is_a(self.classes[path], d.owner)), None)

    def note(self, path: str, deprecation: Deprecation, value: Any = None, new_value: Any = None) -> None:
        old = f"{path}.init_args.{deprecation.key}"
        if deprecation.new is None:
            self.notes[f"{old} is deprecated and ignored: {deprecation.reason}"] = None
        else:
            mapped = f" ({value!r} is now {new_value!r})" if new_value != value else ""
            self.notes[f"{old} is deprecated; use {path}.init_args.{deprecation.new}{mapped}"] = None

    # -- configs: a --config file, or a YAML value given to one key ---------------------------------------------

    def node(self, node: Any, path: str) -> Any:
        """``node`` (the value of the key at ``path``; "" for a whole config) with old keys replaced."""
        if isinstance(node, list):
            return [self.node(item, f"{path}[{i}]") for i, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        if "class_path" in node:
            self.classes[path] = node["class_path"]
        upgraded = {}
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if key == "init_args" and isinstance(value, dict):
                value = self.init_args(value, path)
            upgraded[key] = self.node(value, child)
        return upgraded

    def init_args(self, init_args: dict, path: str) -> dict:
        upgraded = {}
        for key, value in init_args.items():
            deprecation = self.deprecation(path, key)
            if deprecation is None:
                moved = upgraded.get(key)  # a block that old keys moved into already: the given values win
                upgraded[key] = {**moved, **value} if isinstance(moved, dict) and isinstance(value, dict) else value
                continue
            new_value = _mapped(deprecation, value)
            self.note(path, deprecation, value, new_value)
            if deprecation.new is None:
                continue
            # A dotted new name moved the key into a block (``speed.compile_blocks``); the new key, given too, wins.
            *blocks, leaf = deprecation.new.split(".")
            target, given = upgraded, init_args
            for block in blocks:
                target = target.setdefault(block, {}) if isinstance(target.get(block, {}), dict) else {}
                given = given.get(block, {}) if isinstance(given.get(block, {}), dict) else {}
            if leaf not in given:
                target[leaf] = new_value
        return upgraded

    def config(self, text: str, path: str) -> str | None:
        """The upgraded YAML of ``text`` (a file's path, or YAML) for the key at ``path``; None when it had no old
        key."""
        try:
            if os.path.isfile(text):
                with open(text) as f:
                    text = f.read()
            loaded = get_loader("yaml")(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None  # not a config: left to jsonargparse
        notes = len(self.notes)
        upgraded = self.node(loaded, path)
        return yaml.safe_dump(upgraded, sort_keys=False) if len(self.notes) > notes else None

    # -- one command-line argument ----------------------------------------------------------------------------

    def canonical(self, key: str) -> list[str]:
        """``key``'s parts with ``init_args`` after each one that holds a class (``model.vision`` →
        ``model.init_args.vision``), as jsonargparse reads them."""
        parts = [key.split(".")[0]]
        for part in key.split(".")[1:]:
            if ".".join(parts) in self.classes and part not in ("init_args", "class_path", "dict_kwargs"):
                parts.append("init_args")
            parts.append(part)
        return parts

    def argument(self, key: str, value: str | None) -> list[str] | None:
        """What ``--key value`` becomes: None when unchanged, [] when the key is dropped."""
        if key == "config":
            upgraded = None if value is None else self.config(value, "")
            return None if upgraded is None else [f"--config={upgraded}"]
        parts, changed = self.canonical(key), False
        for i in range(len(parts) - 1):
            deprecation = self.deprecation(".".join(parts[:i]), parts[i + 1]) if parts[i] == "init_args" else None
            if deprecation is None:
                continue
            loaded = None if i + 2 < len(parts) or value is None else _load(value)
            mapped = _mapped(deprecation, loaded)
            self.note(".".join(parts[:i]), deprecation, loaded, mapped)
            new_value = value if mapped == loaded else _text(mapped)
            if deprecation.new is None:
                return []
            parts[i + 1], value, changed = deprecation.new, new_value, True
        key = ".".join(parts)
        if value is not None and key.endswith(".class_path"):
            self.classes[key[: -len(".class_path")]] = value
        elif value is not None and (value.lstrip().startswith(("{", "[")) or value.endswith((".yaml", ".yml"))):
            upgraded = self.config(value, key)  # a YAML value or file for one key: ``--model model.yaml``
            value, changed = (upgraded, True) if upgraded is not None else (value, changed)
        elif value is not None and re.fullmatch(r"[A-Za-z_][\w.]*", value):
            self.classes[key] = value  # a class name or path, as ``--model ContrastiveStage`` gives one
        return [f"--{key}" + ("" if value is None else f"={value}")] if changed else None


def _load(value: str) -> Any:
    """A command-line value as jsonargparse reads it (``3`` a number, ``pairs`` a string)."""
    try:
        return get_loader("yaml")(value)
    except yaml.YAMLError:
        return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def upgrade_config(config: dict) -> dict:
    """A whole configuration (a composed recipe) with every deprecated key under its new name, each warned once."""
    run = _Upgrade(DEPRECATIONS)
    upgraded = run.node(config, "")
    for message in run.notes:
        rank_zero_warn(message, category=FutureWarning)
    return upgraded


def upgrade(args: list[str], table: tuple[Deprecation, ...] | None = None) -> list[str]:
    """``args`` with every deprecated key of ``table`` (:data:`DEPRECATIONS`) under its new name, or left out when
    dropped, each warned once (the CLI passes its arguments with the recipes' layers expanded)."""
    argv = list(args)
    run, upgraded, i = _Upgrade(DEPRECATIONS if table is None else table), [], 0
    while i < len(argv):
        token = argv[i]
        if token != "-c" and not (token.startswith("--") and len(token) > 2):
            upgraded.append(token)
            i += 1
            continue
        key, inline, value = ("config" if token == "-c" else token[2:]).partition("=")
        given = 1
        if not inline:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            given += value is not None
        replacement = run.argument(key, value)
        upgraded += argv[i : i + given] if replacement is None else replacement
        i += given
    for message in run.notes:
        rank_zero_warn(message, category=FutureWarning)
    return upgraded
