"""What a Lightning checkpoint needs beyond weights, optimiser and schedule for a resumed run to
repeat an uninterrupted one exactly: the random state of every rank and the data position."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_internvl.checkpoint_io import RUN_FACTS, install, stage_name
from lit_internvl.distributed import world


def rng_states() -> dict:
    """The torch, CUDA, numpy and Python generator states, as plain tensors, lists and numbers (so that
    ``torch.load(weights_only=True)`` reads them back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _loaders(iterables) -> list:
    if isinstance(iterables, dict):
        return [x for value in iterables.values() for x in _loaders(value)]
    if isinstance(iterables, (list, tuple)):
        return [x for value in iterables for x in _loaders(value)]
    return [] if iterables is None else [iterables]


def _group_options(group: dict) -> dict:
    """An optimiser group's options as configured: its base learning rate (before any schedule), betas, decay."""
    options = {k: group[k] for k in ("weight_decay", "betas") if k in group}
    options["lr"] = group.get("initial_lr", group["lr"])
    return options


def _apply_options(trainer, configured: list[list[dict]]) -> None:
    """Set the optimiser options this run configured (a learning rate given on resume) over those the checkpoint
    restored, the schedule's base learning rates with them; nothing changes when they agree."""
    for optimizer, groups in zip(trainer.optimizers, configured, strict=True):
        if [_group_options(g) for g in optimizer.param_groups] == groups:
            continue
        for group, options in zip(optimizer.param_groups, groups, strict=True):
            ratio = options["lr"] / group.get("initial_lr", group["lr"]) if group.get("initial_lr", group["lr"]) else 1
            group.update({k: v for k, v in options.items() if k != "lr"})
            if "initial_lr" in group:
                group["initial_lr"] = options["lr"]
            group["lr"] *= ratio
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if scheduler.optimizer is optimizer and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [options["lr"] for options in groups]
                if hasattr(scheduler, "lr_lambdas"):  # the schedule's value at the restored step, exactly
                    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                        group["lr"] = base * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _count_batches_as_the_loader_does(trainer) -> None:
    """A train loader resumed with another batch size or number of processes continues its epoch at another batch
    index than the checkpoint counted (:class:`~lit_internvl.data.resumable.ResumableDataLoader`): Lightning's count
    of the epoch's batches follows it, so that the epoch ends when its data does, every sample trained once."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    for loader in _loaders(trainer.train_dataloader):
        saved, now = getattr(loader, "resumed_batches", None) or (0, 0)
        if saved != now:
            for counts in (progress.current, progress.total):
                for field in ("ready", "started", "processed", "completed"):
                    setattr(counts, field, getattr(counts, field) + now - saved)
            rank_zero_info(f"Resumed with another global batch: the epoch continues at batch {now} (was {saved})")
        if hasattr(loader, "resumed_batches"):
            loader.resumed_batches = None


def _continue_a_cut_epoch(checkpoint: dict) -> None:
    """A checkpoint written when ``max_steps`` ended a run mid-epoch counts that epoch processed: Lightning would
    resume an extended run (a larger ``max_steps``) at the next epoch, the rest of this one never trained. Count it
    as a run killed mid-epoch is counted (started, not processed), so the run continues with the next sample."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = fit_loop.get("epoch_progress")
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    if not epochs or batches.get("is_last_batch", True) or not (batches.get("current") or {}).get("completed"):
        return
    for counts in (epochs["total"], epochs["current"]):
        if counts["processed"] == counts["started"] and counts["started"] == counts["ready"]:
            counts["processed"] = counts["completed"] = counts["started"] - 1


class ExactResume(L.Callback):
    """Every stage adds this callback (``Stage.configure_callbacks``).

    - Checkpoint files: it gives the trainer's strategy :class:`~lit_internvl.checkpoint_io.SafeCheckpointIO`
      (read with ``weights_only=True`` from any path or URL, written beside the target and renamed).

    - Random state: the torch, CUDA, numpy and Python generators of every rank are saved with the
      checkpoint and set again just before the first batch a resumed run trains on, so stochastic layers
      (drop-path, dropout) draw what the uninterrupted run drew at that step.
    - Data position: after each training batch it tells the train loaders that can take it
      (:mod:`lit_internvl.data.resumable`) that the batch is done, so that the loader state Lightning
      saves excludes the batch Lightning has already fetched for the next step.
    - A saved data position that never reached the loader is an error, not a silent restart of the epoch.
      Lightning hands the checkpoint's loader states over only when its fit loop builds the train loader
      after restoring the loops (``_FitLoop.setup_data`` → ``_load_combined_loader_states``); a loader built
      earlier — by ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` when ``max_epochs``
      ends the run — is kept as it is, and the resumed epoch would start from its first batch again.
    """

    def __init__(self) -> None:
        self._rng_to_restore: dict | None = None
        self._options: list[list[dict]] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before Lightning reads --ckpt_path (after the setup hooks): every checkpoint read with weights_only=True,
        # every file written beside its target and renamed.
        install(trainer.strategy)

    def on_fit_start(self, trainer, pl_module) -> None:
        # The optimiser as this run's options built it, before Lightning restores the checkpoint's over it.
        self._options = [[_group_options(g) for g in optimizer.param_groups] for optimizer in trainer.optimizers]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        _continue_a_cut_epoch(checkpoint)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None and self._options is not None:
            _apply_options(trainer, self._options)
        _count_batches_as_the_loader_does(trainer)
        fit_loop = trainer.fit_loop
        if fit_loop.restarting and getattr(fit_loop, "_combined_loader_states_to_load", None):
            raise RuntimeError(
                "The checkpoint's train-loader position was not loaded: the train dataloader was built before "
                "Lightning restored the loops (e.g. trainer.estimated_stepping_batches read in configure_optimizers, "
                "which builds it when max_epochs ends the run), so the resumed epoch would repeat its first batches. "
                "Read estimated_stepping_batches once training has started (see Stage.configure_optimizers)."
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for loader in _loaders(trainer.train_dataloader):
            if callable(getattr(loader, "mark_consumed", None)):
                loader.mark_consumed()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_FACTS] = {"stage": stage_name(type(pl_module))}

    def state_dict(self) -> dict:
        states = rng_states()
        _, world_size = world()
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, states)
            return {"rng": gathered}
        return {"rng": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("rng") or []
        rank, world_size = world()
        if len(states) == world_size:
            self._rng_to_restore = states[rank]
        elif states:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(states)} processes and this run has {world_size}: "
                "each process goes on from its own seeded state, so dropout and drop-path draw otherwise than the "
                "saved run would have (the data continues exactly)."
            )
