"""FSDP2's distributed checkpoint (a folder: one shard per rank and ``meta.pt``) on two gloo ranks, the job killed at
each moment of a save: the checkpoint a resumed run finds is whole — the old one or the new one, never new shards
with old loop counters — and the run then continues exactly as the uninterrupted run did.

The run saves ``last.ckpt`` after every step and nothing else (``save_top_k: 0``: the only checkpoint). The kill comes
during the save after step 2: rank 0 SIGKILLs the other rank and itself at the moment named."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_internvl import checkpoint_io
from lit_internvl.checkpoint_io import newest_complete
from lit_internvl.distributed import FSDP2Strategy, leave_process_group
from tests.test_fsdp import _data, _stage

pytestmark = pytest.mark.slow  # a two-rank run a case, about ten seconds each

WORLD_SIZE, STEPS, KILL_AT = 2, 3, 2


class StepLog(L.Callback):
    """Rank 0 appends each step's loss to ``path`` (the process may be killed)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        torch.distributed.all_reduce(loss)
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": loss.item() / WORLD_SIZE}) + "\n")


def _kill_job(pids: list[int]) -> None:
    for pid in pids:
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(moment: str, trainer_of, pids: list[int]) -> None:
    """Patch rank 0's save so that the job dies at ``moment`` of the save after step KILL_AT."""
    from lightning.fabric.strategies import fsdp as fabric_fsdp

    def now() -> bool:
        return torch.distributed.get_rank() == 0 and trainer_of().global_step == KILL_AT

    def at(owner, name: str, before: bool = True, call: int = 1):
        original, calls = getattr(owner, name), []

        def wrapped(*args, **kwargs):
            if now():
                calls.append(1)
                if before and len(calls) == call:
                    _kill_job(pids)
            result = original(*args, **kwargs)
            if now() and not before and len(calls) == call:
                _kill_job(pids)
            return result

        setattr(owner, name, wrapped)

    if moment == "shards-cut-short":  # every shard written, then one of them cut, as a kill mid-write leaves it

        def cut(state, path):
            fabric_fsdp_save(state, path)
            if now():
                shard = sorted(Path(path).glob("*.distcp"))[-1]
                shard.write_bytes(shard.read_bytes()[:100])
                _kill_job(pids)

        fabric_fsdp_save = fabric_fsdp._distributed_checkpoint_save
        fabric_fsdp._distributed_checkpoint_save = cut
    elif moment == "shards-written":
        at(fabric_fsdp, "_distributed_checkpoint_save", before=False)
    elif moment == "metadata-written":
        at(checkpoint_io, "mark_complete")
    elif moment == "marked":
        at(checkpoint_io, "swap_in")
    elif moment == "between-renames":  # the old checkpoint moved aside, the new one not yet in its place
        swap_in, rename = checkpoint_io.swap_in, os.rename

        def old_aside_only(new, target):
            def first_only(source, destination):
                rename(source, destination)
                _kill_job(pids)

            os.rename = first_only if now() else rename
            try:
                swap_in(new, target)
            finally:
                os.rename = rename

        checkpoint_io.swap_in = old_aside_only
    elif moment == "old-aside":
        at(checkpoint_io, "_remove")


def _worker(rank: int, port: int, out: str, mode: str, moment: str | None, pids_file: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(1)
    out = Path(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                      NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    folder = out / "checkpoints"
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=FSDP2Strategy(), max_steps=STEPS, default_root_dir=out,
        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[StepLog(out / f"{mode}.jsonl"), saver],
    )  # fmt: skip
    if moment is not None:
        pids = [int(p) for p in Path(pids_file).read_text().split()]
        _arm(moment, lambda: trainer, pids)
    ckpt_path = str(newest_complete([folder])) if mode == "resumed" else None
    trainer.fit(_stage(), _data(8 // WORLD_SIZE), ckpt_path=ckpt_path)
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out: Path, mode: str, moment: str | None = None) -> list[dict]:
    pids_file = out / "pids"
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out), mode, moment, str(pids_file)), nprocs=WORLD_SIZE, join=False,
        start_method="spawn",
    )  # fmt: skip
    pids_file.write_text(" ".join(str(p) for p in context.pids()))
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        assert moment is not None and error.signal_name == "SIGKILL", error
    log = out / f"{mode}.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory.mktemp("uninterrupted"), "run")


# moment → the step of the checkpoint a resumed run finds: the old one (1) until the new one is in place.
MOMENTS = {
    "shards-cut-short": 1, "shards-written": 1, "metadata-written": 1, "marked": 1, "between-renames": 2,
    "old-aside": 2,
}  # fmt: skip


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_distributed_save_resumes_from_a_whole_checkpoint_exactly(tmp_path, uninterrupted, moment):
    killed = _spawn(tmp_path, "killed", moment)
    assert [r["step"] for r in killed] == [1, 2], "killed during the save after step 2"
    folder = tmp_path / "checkpoints"
    found = newest_complete([folder])
    assert found == folder / "last.ckpt"
    assert checkpoint_io.read_checkpoint(found)["global_step"] == MOMENTS[moment]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], "nothing left of the killed save"
    resumed = _spawn(tmp_path, "resumed")
    assert [r["step"] for r in resumed] == list(range(MOMENTS[moment] + 1, STEPS + 1))
    assert [r["loss"] for r in killed[: MOMENTS[moment]] + resumed] == [r["loss"] for r in uninterrupted]


def test_an_unmarked_distributed_checkpoint_is_refused(tmp_path, uninterrupted):
    """A folder written before completion markers (or by a save cut off) is never resumed from."""
    folder = tmp_path / "checkpoints"
    _spawn(tmp_path, "killed", "metadata-written")
    (folder / "last.ckpt" / checkpoint_io.COMPLETE).unlink()
    with pytest.raises(checkpoint_io.CheckpointError, match=r"last\.ckpt \(no COMPLETE marker"):
        newest_complete([folder])
