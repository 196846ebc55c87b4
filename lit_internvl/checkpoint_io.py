"""The checkpoints of a training run: read safely from any path or URL, written so that no kill, full disk or
filesystem boundary can lose the previous one, and found again on resume.

Reading (:func:`read_checkpoint`): every checkpoint is unpickled with ``torch.load(weights_only=True)`` — tensors,
numbers, strings, lists and dicts, nothing that runs code — whether it is a local file, an ``http(s)://`` URL
(Lightning's own loader would unpickle a URL with ``weights_only=False``) or another fsspec URL (``s3://``). A
refusal, a truncated or a corrupt file is a :class:`CheckpointError` naming the file.

Writing one file (:func:`write_atomically`)::

    <dir>/.partial-<token>   written, flushed, fsynced        (same folder: the rename never crosses filesystems)
            │ os.replace                                      (atomic: the target is the old file or the new one)
            ▼
    <dir>/last.ckpt

Lightning's own "atomic" save goes through a temporary file in ``$TMPDIR`` and, when the run folder is on another
filesystem (a scratch mount, a tmpfs), copies it over the old checkpoint. A write that fails (a full disk, a file
size limit) removes its partial file and leaves the old checkpoint as it was; a killed write leaves a partial file
that the next save in that folder removes (:func:`tidy`).

Writing a folder (FSDP2's distributed checkpoint, one shard per rank and ``meta.pt``: :func:`swap_in`): every rank
writes into a new folder ``<dir>/.partial-<token>/``, rank 0 writes :data:`COMPLETE` last, then moves the old
checkpoint aside (``.aside-<token>``), renames the new one into place and removes the old one. A kill between the two
renames leaves no checkpoint under the target name but a complete new one beside it: :func:`tidy` renames it into
place before anything reads the folder. A folder without :data:`COMPLETE` is never resumed from.

Resuming (:func:`newest_complete`): ``--ckpt_path last`` is the newest complete checkpoint of the run's checkpoint
folders; those skipped are named with the reason, and none at all is an error.

:class:`SafeCheckpointIO` is the Lightning plug-in: :class:`~lit_internvl.callbacks.resume.ExactResume` (a callback
of every stage) installs it on the trainer's strategy; :class:`~lit_internvl.distributed.FSDP2Strategy` uses
:func:`swap_in` for its folders.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

RUN_FACTS = "lit_internvl_run"  # the checkpoint's entry of facts about the run: {"stage": "module.Class", ...}
COMPLETE = "COMPLETE"  # a distributed checkpoint's last file: JSON {"target", "global_step", "time"}
METADATA = "meta.pt"  # Lightning's file of a distributed checkpoint's loops, callbacks and hyper-parameters
PARTIAL, ASIDE = ".partial-", ".aside-"  # names free of "last": Lightning's own "last" search matches substrings


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or resumed from; the message names the file and the reason."""


def is_url(source: str | os.PathLike) -> bool:
    return "://" in str(source) and not str(source).startswith("file://")


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


# -- reading ---------------------------------------------------------------------------------------------------------


def _download(url: str, timeout: float = 60.0) -> io.BytesIO:
    """The bytes at an ``http(s)://`` URL, in memory (nothing cached on disk under a name another URL could share)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's own --ckpt_path
            return io.BytesIO(response.read())
    except OSError as error:
        raise CheckpointError(f"{url}: could not be downloaded ({error})") from error


def read_checkpoint(source: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """The checkpoint at ``source`` (a file, a distributed checkpoint's folder — its ``meta.pt``, the loops and
    hyper-parameters without the shards — an ``http(s)://`` or fsspec URL), unpickled with ``weights_only=True``.
    ``mmap``: a local file's tensors stay in the file until read (for a look at its hyper-parameters)."""
    name = str(source)
    try:
        if name.startswith(("http://", "https://")):
            return torch.load(_download(name), map_location=map_location, weights_only=True)
        if is_url(name):
            from lightning.fabric.utilities.cloud_io import get_filesystem

            with get_filesystem(name).open(name, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        path = Path(name.removeprefix("file://"))
        if path.is_dir():
            problem = incomplete(path)
            if problem:
                raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
            path = path / METADATA
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {name}")
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:  # weights_only refused an object: nothing was run
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{name} was refused: it holds more than tensors and plain values, and lit_internvl reads checkpoints "
            f"with torch.load(weights_only=True) only, never running code from one ({reason})"
        ) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{name} is truncated or corrupt ({type(error).__name__}: {error})") from None


# -- completeness ----------------------------------------------------------------------------------------------------


def incomplete(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a checkpoint a run can resume from, or None when it is: a file must be a whole zip archive
    of ``torch.save`` (a cut-off write loses the archive's directory at its end), a folder must hold
    :data:`COMPLETE` and ``meta.pt``."""
    path = Path(path)
    if not path.exists():
        return "it does not exist"
    if path.is_dir():
        if not (path / COMPLETE).is_file():
            return (
                f"no {COMPLETE} marker (its save was cut off, or it was written before lit_internvl marked complete "
                "distributed checkpoints)"
            )
        if not (path / METADATA).is_file():
            return f"no {METADATA}"
        return None
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return "no data.pkl in its archive"
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a whole torch.save archive ({error})"
    return None


def _marker(path: Path) -> dict:
    try:
        return json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open folders: the rename stands without the sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        (path / COMPLETE).unlink(missing_ok=True)  # first: a half-removed folder is never taken for a checkpoint
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- writing ---------------------------------------------------------------------------------------------------------


class _Writes:
    """A file's ``write`` and ``flush`` that keep the ``OSError`` (a full disk, a size limit) the writer met: torch's
    zip writer reports it only as "unexpected pos 768 vs 662"."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = error
            raise


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a new file ``path``, then flush and sync it to disk; a disk error the writer met is
    raised as that ``OSError``."""
    with open(path, "wb") as f:
        writes = _Writes(f)
        try:
            write(writes)
            f.flush()
            os.fsync(f.fileno())
        except Exception as error:
            if writes.error is not None and writes.error is not error:
                raise writes.error from error
            raise


def write_atomically(target: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a new file beside ``target`` and rename it over ``target`` once written and synced:
    ``target`` is at every moment the old complete file or the new complete one. A failure removes the new file
    and raises a :class:`CheckpointError` saying the old one is unchanged."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f"{PARTIAL}{_token()}"
    try:
        write_file(partial, write)
        if target.is_dir() and not target.is_symlink():  # a distributed checkpoint of an earlier run
            swap_in(partial, target)
        else:
            os.replace(partial, target)
            _fsync_dir(target.parent)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, Exception):
            kept = "the previous checkpoint there is unchanged" if target.exists() else "nothing was written"
            raise CheckpointError(f"saving {target} failed ({type(error).__name__}: {error}); {kept}") from error
        raise
    tidy(target.parent)


def mark_complete(folder: Path, target: Path, global_step: int | None) -> None:
    """Write ``folder``'s :data:`COMPLETE` marker (synced): every other file of the checkpoint is on disk."""
    with open(folder / COMPLETE, "w") as f:
        json.dump({"target": target.name, "global_step": global_step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def swap_in(new: Path, target: Path) -> None:
    """Put the complete checkpoint ``new`` (a file or a marked folder beside ``target``) in ``target``'s place: the old
    one is moved aside, ``new`` renamed into place, the old one removed."""
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.parent / f"{ASIDE}{_token()}"
        os.rename(target, aside)
    os.rename(new, target)  # a kill before this line: tidy() renames `new` into place
    _fsync_dir(target.parent)
    if aside is not None:
        _remove(aside)


def tidy(folder: str | os.PathLike) -> list[str]:
    """Finish or remove what killed saves left in ``folder``: a complete new distributed checkpoint whose target is
    missing (killed between the renames of :func:`swap_in`) is renamed into place; every other partial or aside entry
    is removed. Returns what it did, one line each."""
    folder = Path(folder)
    if not folder.is_dir() or rank_zero_only.rank != 0:  # one process tidies a folder that all of them may share
        return []
    done = []
    leftovers = sorted(p for p in folder.iterdir() if p.name.startswith((PARTIAL, ASIDE)))
    # Newest first, partial (new) before aside (old): the first complete one for a missing target is the newest state.
    leftovers.sort(key=lambda p: (-(_marker(p).get("time") or 0.0), not p.name.startswith(PARTIAL)))
    for path in leftovers:
        target_name = _marker(path).get("target") if path.is_dir() else None
        try:
            if target_name and incomplete(path) is None and not (folder / target_name).exists():
                os.rename(path, folder / target_name)
                _fsync_dir(folder)
                done.append(
                    f"{folder / target_name}: put back in place from {path.name} (a save killed between renames)"
                )
                continue
            _remove(path)
        except FileNotFoundError:  # another process (a second run on the folder) was quicker
            continue
        done.append(f"{path}: removed (left by a save that did not finish)")
    for line in done:
        rank_zero_info(line)
    return done


# -- resuming --------------------------------------------------------------------------------------------------------


def newest_complete(folders: Iterable[str | os.PathLike]) -> Path:
    """The newest complete checkpoint (``*.ckpt`` files and folders) in ``folders``, by modification time (``last``
    first among equals); each newer one skipped is named with the reason (a warning). Raises a
    :class:`CheckpointError` when there is none."""
    folders = [Path(f) for f in folders]
    candidates: list[Path] = []
    for folder in folders:
        tidy(folder)
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    skipped = []
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True):
        problem = incomplete(path)
        if problem is None:
            if skipped:
                rank_zero_warn(f"--ckpt_path last: resuming from {path}; skipped " + "; ".join(skipped))
            return path
        skipped.append(f"{path} ({problem})")
    where = ", ".join(str(f) for f in folders) or "no checkpoint folder (no ModelCheckpoint callback)"
    found = f": {'; '.join(skipped)}" if skipped else ""
    raise CheckpointError(f"--ckpt_path last: no complete checkpoint in {where}{found}")


# -- what a resumed run must agree with ------------------------------------------------------------------------------

# Options a resumed run may change: they shape no state the checkpoint restores (the optimiser's learning rates,
# betas and weight decay are set again after the restore, see ExactResume), so the new value applies from the first
# step resumed. Any other change of a stage's option is refused: it would continue another run than the one saved.
APPLIED_ON_RESUME = frozenset(
    {
        "learning_rate", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "part_lr", "vision_layer_decay",
        "generation", "speed", "activation_checkpointing", "attn_backend", "init_from", "init_from_rename",
    }
)  # fmt: skip


def stage_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def saved_stage(checkpoint: dict) -> str | None:
    """The stage class that wrote ``checkpoint`` (``module.Class``), or None when it does not say."""
    stage = (checkpoint.get(RUN_FACTS) or {}).get("stage")
    if stage:
        return stage
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")  # LightningCLI's record
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        import importlib

        return stage_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return class_path


def _fitting(module) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and str(trainer.state.fn) in ("fit", "TrainerFn.FITTING")


def check_stage(module, checkpoint: dict, source) -> None:
    """A run resumes (``fit --ckpt_path``) only a checkpoint of its own stage class; other commands only say so."""
    saved, run = saved_stage(checkpoint), stage_name(type(module))
    if saved is None or saved == run:
        return
    if not _fitting(module):
        rank_zero_info(f"{source} was written by {saved}; evaluated here with {run}")
        return
    raise CheckpointError(
        f"--ckpt_path {source} is a checkpoint of {saved}, and this run's stage (model.class_path) is {run}: a run "
        f"resumes only its own stage's checkpoints. To start a {type(module).__name__} run from its weights, give it "
        "as model.init_args.init_from instead."
    )


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_hyperparameters(module, checkpoint: dict, source) -> list[str]:
    """Compare a resumed run's options (``module.hparams``) with the checkpoint's: a change outside
    :data:`APPLIED_ON_RESUME` is an error naming each key; the others are logged and returned (they apply)."""
    if not _fitting(module):
        return []
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    run = {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}
    changed = sorted(k for k in saved.keys() & run.keys() if _plain(saved[k]) != _plain(run[k]))
    describe = {k: f"model.init_args.{k}: {saved[k]!r} in the checkpoint, {run[k]!r} now" for k in changed}
    refused = [describe[k] for k in changed if k not in APPLIED_ON_RESUME]
    if refused:
        raise CheckpointError(
            f"--ckpt_path {source}: a resumed run continues the run it saved, and this one changes "
            + "; ".join(refused)
            + ". Give the checkpoint's values, or start a new run from its weights (model.init_args.init_from)."
        )
    for key in changed:
        rank_zero_info(f"--ckpt_path {source}: resumed with {describe[key]} (applied from the first step resumed)")
    return changed


def fingerprint(module) -> dict[str, list[float]]:
    """Per tensor of ``module``'s state (unsharded), its float64 sum and sum of squares: enough to tell whether a
    model rebuilt from a file on resume is the one a run started from (MPO's reference), cheap on any size."""
    out = {}
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if (
                torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.is_meta
            ):  # meta: a plan, no weights
                values = tensor.detach().double()
                out[name] = [values.sum().item(), values.square().sum().item()]
    return out


def fingerprint_differences(saved: dict, now: dict, rel: float = 1e-6) -> list[str]:
    """The tensor names whose fingerprints disagree (beyond summation-order rounding), or that one side lacks."""

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)

    names = sorted(saved.keys() | now.keys())
    return [n for n in names if n not in saved or n not in now or not all(map(close, saved[n], now[n]))]


# -- the Lightning plug-in -------------------------------------------------------------------------------------------


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` reading with ``weights_only=True`` from any path or URL
    (:func:`read_checkpoint`) and writing local files with :func:`write_atomically`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or is_url(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                f"{path}: weights_only=False was asked for; lit_internvl reads checkpoints with weights_only=True only"
            )
        if not is_url(path):
            problem = incomplete(path)
            if problem is not None and Path(path).exists():
                raise CheckpointError(f"{path} cannot be resumed from: {problem}")
        return read_checkpoint(path, map_location)


def install(strategy) -> None:
    """Give ``strategy`` a :class:`SafeCheckpointIO` unless it has a checkpoint plug-in of its own (a user's)."""
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
