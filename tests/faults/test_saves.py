"""Saves that cannot lose the previous checkpoint: a single-file save killed at each of its moments, on the same
filesystem as ``$TMPDIR`` and on another one, a full disk, and resuming from the newest complete checkpoint."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_internvl import checkpoint_io
from lit_internvl.checkpoint_io import CheckpointError, SafeCheckpointIO, newest_complete, tidy
from tests.faults.kills import die, killed
from tests.faults.runs import cli

OLD = {"global_step": 1, "weights": torch.arange(50_000, dtype=torch.float32)}
NEW = {"global_step": 2, "weights": torch.arange(50_000, dtype=torch.float32) * 2}


def _device(path: Path) -> int:
    return os.stat(path).st_dev


@pytest.fixture(params=["same", "other"], ids=["same-filesystem", "other-filesystem"])
def run_folder(request, tmp_path):
    """A run's checkpoint folder on the filesystem of ``$TMPDIR`` (here: tmp_path) or on another one (/dev/shm)."""
    if request.param == "same":
        yield tmp_path / "checkpoints"
        return
    shm = Path("/dev/shm")
    if not shm.is_dir() or _device(shm) == _device(tmp_path):
        pytest.skip("/dev/shm is not another filesystem here")
    folder = Path(tempfile.mkdtemp(dir=shm)) / "checkpoints"
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


_save = torch.save  # the real one: the tests patch torch.save in their children


def _half_written(obj, f) -> None:
    buffer = io.BytesIO()
    _save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    die()


# The moments of SafeCheckpointIO.save_checkpoint, and what the target holds after a kill there.
MOMENTS = {
    "writing": ("old", lambda mp: mp.setattr(checkpoint_io.torch, "save", _half_written)),
    "written-before-rename": ("old", lambda mp: mp.setattr(checkpoint_io.os, "replace", lambda *a: die())),
    "renamed-before-sync": ("new", lambda mp: mp.setattr(checkpoint_io, "_fsync_dir", lambda *a: die())),
    "renamed-before-tidy": ("new", lambda mp: mp.setattr(checkpoint_io, "tidy", lambda *a: die())),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_save_leaves_the_old_or_the_new_checkpoint_whole(run_folder, moment, monkeypatch):
    target = run_folder / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(OLD, target)
    expected, arm = MOMENTS[moment]
    assert killed(lambda: arm(monkeypatch), lambda: SafeCheckpointIO().save_checkpoint(NEW, target))
    assert torch.load(target, weights_only=True)["global_step"] == {"old": 1, "new": 2}[expected]
    assert newest_complete([run_folder]) == target
    assert sorted(p.name for p in run_folder.iterdir()) == ["last.ckpt"], "no partial file is left"


def test_lightning_own_save_across_filesystems_loses_the_checkpoint(tmp_path, monkeypatch):
    """The negative control: Lightning's TorchCheckpointIO writes a temporary file in $TMPDIR and, from another
    filesystem, copies it over the old checkpoint; a kill during that copy leaves the only checkpoint truncated."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or _device(shm) == _device(tmp_path):
        pytest.skip("/dev/shm is not another filesystem here")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        target = folder / "last.ckpt"
        TorchCheckpointIO().save_checkpoint(OLD, target)

        def arm() -> None:
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

            def copy_half(source, destination, *args, **kwargs):
                with open(source, "rb") as f, open(destination, "wb") as out:
                    out.write(f.read()[:1000])
                die()

            monkeypatch.setattr(shutil, "copyfile", copy_half)

        assert killed(arm, lambda: TorchCheckpointIO().save_checkpoint(NEW, target))
        assert checkpoint_io.incomplete(target) is not None  # the old checkpoint is gone
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(OLD, target)

    def no_space(obj, f) -> None:
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"saving .*last\.ckpt failed .*No space left on device.*unchanged"):
        SafeCheckpointIO().save_checkpoint(NEW, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB filesystem (a tmpfs mount; skipped where this process may not mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


# A new checkpoint larger than the 256 KiB filesystem: no save can write it whole.
BIGGER = {"global_step": 2, "weights": torch.arange(80_000, dtype=torch.float32)}  # 320 KB


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_tmpfs):
    target = small_tmpfs / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(OLD, target)  # 200 KB of the 256 KiB
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        SafeCheckpointIO().save_checkpoint(BIGGER, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], OLD["weights"])
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["last.ckpt"]


def test_lightning_own_save_on_a_full_disk_loses_the_previous_checkpoint(small_tmpfs):
    """The control: Lightning's save writes over the old file in place, so the full disk leaves neither whole."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    target = small_tmpfs / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(OLD, target)
    with pytest.raises(OSError, match="No space left on device"):
        TorchCheckpointIO().save_checkpoint(BIGGER, target)
    with pytest.raises(Exception):  # noqa: B017 - a truncated archive: whatever torch.load raises for it
        torch.load(target, weights_only=True)


def test_tidy_removes_what_killed_saves_left(tmp_path):
    SafeCheckpointIO().save_checkpoint(OLD, tmp_path / "last.ckpt")
    (tmp_path / ".partial-123-abcd").write_bytes(b"half a checkpoint")
    assert tidy(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- resuming from the newest complete checkpoint ---------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_last_skips_an_incomplete_checkpoint_naming_it(tmp_path):
    older = tmp_path / "epoch=0-step=1.ckpt"
    SafeCheckpointIO().save_checkpoint(OLD, older)
    last = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(NEW, last)
    _truncate(last)  # as a kill during Lightning's copy across filesystems left it
    os.utime(older, (1, 1))
    with pytest.warns(UserWarning, match=r"resuming from .*epoch=0-step=1\.ckpt; skipped .*last\.ckpt \(not a whole"):
        assert newest_complete([tmp_path]) == older


def test_a_truncated_checkpoint_is_an_error_naming_it(tmp_path):
    path = tmp_path / "x.ckpt"
    SafeCheckpointIO().save_checkpoint(NEW, path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=r"x\.ckpt cannot be resumed from: not a whole torch\.save archive"):
        SafeCheckpointIO().load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"x\.ckpt cannot be resumed from: it is empty"):
        SafeCheckpointIO().load_checkpoint(path)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"--ckpt_path last: no complete checkpoint in .*checkpoints"):
        cli("fit", tmp_path / "run", "--ckpt_path", "last")
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing trained from scratch"


def test_weights_only_false_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="weights_only=True only"):
        cli("fit", tmp_path / "run", "--weights_only", "false", "--ckpt_path", str(tmp_path / "x.ckpt"))


def test_a_run_on_another_filesystem_killed_while_saving_resumes_with_ckpt_path_last(monkeypatch):
    """The tiny SFT recipe, its run folder on /dev/shm, two epochs of 2 steps: killed while it writes last.ckpt at
    the end of the second epoch. ``--ckpt_path last`` resumes from the newest whole checkpoint (epoch 1's own), and
    nothing of the killed save is left."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or _device(shm) == _device(Path(tempfile.gettempdir())):
        pytest.skip("/dev/shm is not another filesystem than $TMPDIR here")
    root = Path(tempfile.mkdtemp(dir=shm)) / "run"
    try:
        replace, saves = os.replace, []

        def arm() -> None:
            torch.set_num_threads(1)

            def replace_or_die(source, destination):
                saves.append(destination)
                if str(destination).endswith("last.ckpt") and len(saves) == 4:  # epoch 1: its own, then last
                    die()
                return replace(source, destination)

            monkeypatch.setattr(checkpoint_io.os, "replace", replace_or_die)

        assert killed(arm, lambda: cli("fit", root, "--trainer.max_epochs", "2"))
        folder = root / "checkpoints"
        assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2, "the old last.ckpt, whole"
        resumed = cli("fit", root, "--trainer.max_epochs", "3", "--ckpt_path", "last")
        assert resumed.trainer.ckpt_path == str(folder / "epoch=1-step=4.ckpt")
        assert resumed.trainer.global_step == 6
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no partial file left"
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
