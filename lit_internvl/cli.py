"""Command line: ``python -m lit_internvl fit|validate|test|predict --config RECIPE.yaml``, and the
tools ``prepare`` (records → litdata shards), ``export`` (→ transformers layout), ``chat``,
``report`` (the final metrics of several runs in one table), ``evaluate`` (a benchmark's metric over
``predict``'s answers), ``critic_data`` (the critic's steps records from a policy's samples), ``probe`` (a vision
encoder's linear or segmentation probe, over the few-shot fractions) and ``plan`` (whether a recipe's step fits
its GPUs).

LightningCLI does the work: every stage is a :class:`~lit_internvl.stages.base.Stage` subclass and
every datamodule a ``LightningDataModule``, both chosen by ``class_path`` in YAML, so a user's own
classes plug in without touching this package. Configs are read with omegaconf interpolation
(``${model.init_args.embed_dim}``) resolved on the final config, so command-line overrides reach
the values interpolated from them. A recipe may name layers (``layers: [../models/internvl3_1b.yaml, ...]``):
each ``--config`` of such a recipe is expanded into its layers' ``--config`` before it
(:mod:`lit_internvl.recipes` has the rules).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

import lightning as L
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_internvl.deprecations import upgrade
from lit_internvl.recipes import expand_configs
from lit_internvl.stages.base import Stage


class _Quiet(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger, printed on every run: the first output stays about the
    run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


# Subcommands that are not a Trainer run: name → "module:function", imported only when used.
TOOLS = {
    "prepare": "lit_internvl.tools.prepare:main",
    "export": "lit_internvl.tools.export:main",
    "chat": "lit_internvl.tools.chat:main",
    "report": "lit_internvl.tools.report:main",
    "evaluate": "lit_internvl.tools.evaluate:main",
    "critic_data": "lit_internvl.tools.critic_data:main",
    "probe": "lit_internvl.tools.probe:main",
    "plan": "lit_internvl.tools.plan:main",
}


class RecipeCLI(LightningCLI):
    """LightningCLI reading recipes in layers: ``--config`` of a recipe with ``layers:`` is expanded before parsing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Read by expand_configs, not by the run: accepted so that recipe files may hold it, and left out of
        # --print_config and the saved config.yaml (help=SUPPRESS), which hold the layers' values already.
        parser.add_argument("--layers", type=list[str] | None, default=None, help=argparse.SUPPRESS)
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="The run's name; the trainer layers write to runs/<run_name>. Default: the recipe's path under "
            "recipes/ without .yaml (recipes/internvl3_1b/mpo.yaml: internvl3_1b/mpo).",
        )

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :mod:`lit_internvl.callbacks.console`'s progress bar and model summary (figures that
        were measured only) unless the run turns them off or names its own."""
        from lightning.pytorch.callbacks import ModelSummary as AnySummary
        from lightning.pytorch.callbacks import ProgressBar as AnyBar

        from lit_internvl.callbacks.console import ModelSummary, ProgressBar

        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        flags = {}
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, AnyBar) for c in callbacks):
            callbacks.append(ProgressBar())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, AnySummary) for c in callbacks):
            callbacks.append(ModelSummary())
            # Ours is in the callbacks: the flag only stops Lightning adding its default (and saying it skipped it).
            flags["enable_model_summary"] = False
        return super().instantiate_trainer(**{**kwargs, **flags, "callbacks": callbacks})

    def _parse_ckpt_path(self) -> None:
        """Nothing: LightningCLI would read a local ``--ckpt_path``'s hyper-parameters into the config here, so that the
        checkpoint's values (its stage class included) silently win over the recipe and the command line. The recipe and
        the command line are the run; a checkpoint that disagrees is refused or adapted to, key by key, when it is
        loaded (:mod:`lit_internvl.callbacks.resume`)."""

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """``--ckpt_path last`` is the newest complete checkpoint of the run's ``ModelCheckpoint`` folders (an error
        when there is none, not a silent fresh start); ``--weights_only false`` is refused."""
        from lit_internvl.checkpoint_io import CheckpointError, newest_complete

        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("weights_only") is False:
            raise CheckpointError("--weights_only false: lit_internvl reads checkpoints with weights_only=True only")
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = str(newest_complete(checkpoint_folders(self.trainer)))
        return kwargs

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | dict | Namespace | None) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        # Layers expanded first, so that a renamed or dropped key is found in any layer file, each warned once.
        self.config = parser.parse_args(upgrade(expand_configs(list(sys.argv[1:] if args is None else args))))


def checkpoint_folders(trainer: L.Trainer) -> list[str]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to (``dirpath``, or Lightning's default under
    ``default_root_dir``)."""
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            try:  # Lightning's own rule (the logger's version folder); public only inside a fit
                folder = callback.dirpath or callback._ModelCheckpoint__resolve_ckpt_dir(trainer)
            except Exception:  # noqa: BLE001 - a logger that cannot say yet
                folder = Path(trainer.default_root_dir) / "checkpoints"
            folders.append(str(folder))
    return folders


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI | None:
    """Run a subcommand; ``run=False`` (with ``args`` lacking the subcommand) only builds the
    stage, datamodule and trainer from a config, for tools that reuse recipes."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        module, function = TOOLS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_Quiet())
    # torch 2.13 deprecates a pytree check that Lightning 2.6 still makes: nothing a user of this project can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    return RecipeCLI(
        Stage,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
