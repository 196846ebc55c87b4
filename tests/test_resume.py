"""A run killed after step N and resumed with ``fit(ckpt_path=last)`` repeats the uninterrupted run:
the same losses (exactly, float32 on CPU) and the same samples, none repeated, none skipped.

In process, the kill is an exception raised before step N runs (the checkpoint of step N − 1 is on disk).
The vision encoder uses drop-path, so the random state must be restored too. Cases: mid-epoch in the
first epoch, at an epoch boundary, and mid-epoch in a later epoch (the sampler's epoch must be restored
before Lightning builds the iterator); the shapes world (a map-style dataset) and litdata shards (a
streaming dataset); the run ended by ``max_steps``, by ``max_epochs`` (as every recipe is) or by both —
with ``max_epochs`` Lightning builds the train loader before it restores the loops whenever
``estimated_stepping_batches`` is read in ``configure_optimizers``, and the saved position never reached
the loader.

Through the command line, the shipped recipes (``recipes/sft.yaml``, ``recipes/stage1.yaml``, their
``max_epochs: 1``) with tiny overrides: the process kills itself with SIGKILL before step N and a second
process continues with ``--ckpt_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_internvl.components import Decoder, InternViT, InternViTConfig, PixelShuffleMLP
from lit_internvl.data import RecordsDataModule, ShapesDataModule
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.stages import SFTStage
from lit_internvl.tools.prepare import main as prepare_main
from tests.tiny import asked

STEPS = 6  # 4 batches per epoch: steps 0-3 are epoch 0, 4-5 epoch 1
# What ends the run: all three give the same 6 steps (the second epoch cut at its third batch for the first
# and the last; the shapes loader's 4 batches an epoch end it at 8 for max_epochs alone, see _fit).
ENDS = {
    "max_steps": {"max_steps": STEPS},
    "max_epochs": {"max_epochs": 2},
    "both": {"max_epochs": 2, "max_steps": STEPS},
}
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


class Killed(RuntimeError):
    pass


class Recorder(L.Callback):
    """Per-step loss and sample names; raises before step ``kill_at`` when given."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.losses, self.names = kill_at, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at:
            raise Killed(f"killed before step {self.kill_at}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.names.append(batch.first.sample_names)


def _stage(cls: type[SFTStage] = SFTStage) -> SFTStage:
    torch.manual_seed(0)
    # Drop-path draws from the global generator every step: the resumed run must draw the same.
    vision = InternViT(InternViTConfig.from_name("tiny", drop_path_rate=0.3))
    return cls(
        vision=vision, connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=2,
    )  # fmt: skip


def _fit(make_data, root, kill_at=None, ckpt_path=None, ends="max_steps", stage=None) -> Recorder:
    recorder = Recorder(kill_at)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, checkpoints], **ENDS[ends],
    )  # fmt: skip
    try:
        trainer.fit(stage or _stage(), make_data(), ckpt_path=ckpt_path)
    except Killed:
        assert kill_at is not None
    return recorder


def _shapes() -> ShapesDataModule:
    return asked(
        ShapesDataModule(records="questions", train_size=16, val_size=4, batch_size=4, system="Answer in one word.")
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    jsonl = write_records(root, "conversation", count=8)
    prepare_main(["--input", str(jsonl), "--image-root", str(root), "--output", str(root / "shards")])
    return root / "shards"


def _check_resume(make_data, tmp_path, kill_at: int, ends: str = "max_steps") -> None:
    uninterrupted = _fit(make_data, tmp_path / "a", ends=ends)
    assert len(uninterrupted.losses) == (8 if ends == "max_epochs" else STEPS)
    killed = _fit(make_data, tmp_path / "b", kill_at=kill_at, ends=ends)
    assert len(killed.losses) == kill_at
    resumed = _fit(make_data, tmp_path / "b", ckpt_path="last", ends=ends)
    assert killed.losses + resumed.losses == uninterrupted.losses  # exact: same float32 numbers
    assert killed.names + resumed.names == uninterrupted.names
    for epoch in range(0, len(uninterrupted.names), 4):  # within an epoch no sample twice
        seen = [n for names in uninterrupted.names[epoch : epoch + 4] for n in names]
        assert len(seen) == len(set(seen))


@pytest.mark.parametrize("ends", list(ENDS))
@pytest.mark.parametrize("kill_at", [2, 4, 5], ids=["mid-epoch-0", "epoch-boundary", "mid-epoch-1"])
def test_killed_sft_run_on_shapes_resumes_exactly(tmp_path, kill_at, ends):
    _check_resume(_shapes, tmp_path, kill_at, ends)


def _records(shards):
    def records() -> RecordsDataModule:
        return RecordsDataModule(
            train=str(shards), tile_size=56, max_tiles=1, use_thumbnail=False, batch_size=2,
            max_length=512, shuffle=True,
        )  # fmt: skip

    return records


@pytest.mark.parametrize("ends", list(ENDS))
def test_killed_sft_run_on_litdata_shards_resumes_exactly(tmp_path, shards, ends):
    _check_resume(_records(shards), tmp_path, kill_at=5, ends=ends)


class EagerScheduleStage(SFTStage):
    """Reads the run's length in ``configure_optimizers``, as the schedule did before: with ``max_epochs`` that
    builds the train loader before Lightning restores the loops, so the checkpoint's position is never loaded."""

    def configure_optimizers(self):
        self.trainer.estimated_stepping_batches  # noqa: B018 - the read is the point
        return super().configure_optimizers()


def test_a_loader_position_that_never_reached_the_loader_is_an_error(tmp_path):
    """The negative control of the max_epochs cases: without the guard this run would silently restart the
    epoch's data from its first batch."""
    _fit(_shapes, tmp_path, kill_at=2, ends="max_epochs", stage=_stage(EagerScheduleStage))
    with pytest.raises(RuntimeError, match="estimated_stepping_batches"):
        _fit(_shapes, tmp_path, ckpt_path="last", ends="max_epochs", stage=_stage(EagerScheduleStage))


# -- through the command line, with the shipped recipes' trainer settings ---------------------------------------


class StepLog(L.Callback):
    """Appends each step's loss and samples to the jsonl file ``path``; SIGKILLs its own process just before
    step ``kill_at`` (the checkpoint of step ``kill_at`` − 1 is on disk: ModelCheckpoint saves at batch end)."""

    def __init__(self, path: str, kill_at: int | None = None) -> None:
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        samples = batch.first.sample_names
        with open(self.path, "a") as f:  # json writes a float's repr: read back, it is the same float32 loss
            f.write(json.dumps({"step": trainer.global_step, "loss": loss.item(), "samples": samples}) + "\n")


def _cli_fit(recipe: str, overrides: dict, root: Path, log: Path, kill_at=None, ckpt_path=None) -> int:
    """``python -m lit_internvl fit --config recipes/<recipe> --config <overrides>`` in a new process."""
    config = {
        "trainer": {
            "default_root_dir": str(root), "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            # Replaces the recipe's list: its ModelCheckpoint, saving after every step, and the step log.
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 1, "save_last": True}},
                {"class_path": f"{__name__}.StepLog", "init_args": {"path": str(log), "kill_at": kill_at}},
            ],
        },
        **overrides,
    }  # fmt: skip
    assert "max_epochs" not in config["trainer"] and "max_steps" not in config["trainer"]  # as the recipe says
    path = root.parent / f"{root.name}-{'killed' if kill_at is not None else 'run'}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [
        sys.executable,
        "-m",
        "lit_internvl",
        "fit",
        "--config",
        str(REPO / "recipes" / recipe),
        "--config",
        str(path),
    ]
    args += ["--ckpt_path", str(ckpt_path)] if ckpt_path else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(args, cwd=root.parent, env=env, capture_output=True, text=True, timeout=300)
    if kill_at is None and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.returncode


def _read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _check_cli_resume(tmp_path, recipe: str, overrides: dict, steps: int, kill_at: int) -> None:
    _cli_fit(recipe, overrides, tmp_path / "a", tmp_path / "a.jsonl")
    uninterrupted = _read(tmp_path / "a.jsonl")
    assert [r["step"] for r in uninterrupted] == list(range(1, steps + 1))  # max_epochs: 1 ended it
    code = _cli_fit(recipe, overrides, tmp_path / "b", tmp_path / "b.jsonl", kill_at=kill_at)
    assert code == -signal.SIGKILL and len(_read(tmp_path / "b.jsonl")) == kill_at
    _cli_fit(
        recipe, overrides, tmp_path / "b", tmp_path / "b.jsonl", ckpt_path=tmp_path / "b" / "checkpoints" / "last.ckpt"
    )
    resumed = _read(tmp_path / "b.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]  # exact
    assert [r["samples"] for r in resumed] == [r["samples"] for r in uninterrupted]


_TINY_SFT_MODEL = {"init_args": {"init_from": None, "warmup_steps": 2}}


def test_sft_recipe_killed_mid_epoch_resumes_exactly(tmp_path):
    data = {"init_args": {"train_size": 20, "val_size": 4, "batch_size": 4}}  # 5 steps, killed before step 3
    _check_cli_resume(tmp_path, "sft.yaml", {"model": _TINY_SFT_MODEL, "data": data}, steps=5, kill_at=3)


def test_stage1_recipe_killed_mid_epoch_resumes_exactly(tmp_path):
    data = {"init_args": {"train_size": 40, "val_size": 8, "batch_size": 8}}
    _check_cli_resume(tmp_path, "stage1.yaml", {"model": {"init_args": {"warmup_steps": 2}}, "data": data}, 5, 2)


def test_sft_recipe_on_prepared_shards_killed_mid_epoch_resumes_exactly(tmp_path, shards):
    # The recipe's data replaced by RecordsDataModule over the prepared shards (8 records, 4 steps), with the
    # recipe's tokenizer, tile size and tokens per tile.
    data = {
        "class_path": "lit_internvl.data.RecordsDataModule",
        "init_args": {"train": str(shards), "tokenizer": "shapes", "tile_size": 84,
                      "max_tiles": 1, "use_thumbnail": False, "batch_size": 2, "max_length": 512, "num_workers": 1},
    }  # fmt: skip
    _check_cli_resume(tmp_path, "sft.yaml", {"model": _TINY_SFT_MODEL, "data": data}, steps=4, kill_at=2)


def test_loader_state_excludes_the_batch_lightning_fetched_ahead():
    """The negative control: the loader's own position is one batch past the last batch trained on."""
    loader = _shapes().train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)  # step 0 runs while batch 1 is prefetched
    assert loader.state_dict()["batches"] == 2  # nothing marked: the loader's own position
    loader.mark_consumed()
    assert loader.state_dict()["batches"] == 1  # what a checkpoint after step 0 must hold
    resumed = _shapes().train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert [b["conversation"].sample_names for b in resumed] == [
        b["conversation"].sample_names for b in list(_shapes().train_dataloader())[1:]
    ]
