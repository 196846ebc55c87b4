"""A run killed after step N and resumed with ``fit(ckpt_path=last)`` repeats the uninterrupted run:
the same losses (exactly, float32 on CPU) and the same samples, none repeated, none skipped.

The kill is an exception raised before step N runs (the checkpoint of step N − 1 is on disk), so the
schedule of both runs is the same ``max_steps``. The vision encoder uses drop-path, so the random state
must be restored too. Cases: mid-epoch in the first epoch, at an epoch
boundary, and mid-epoch in a later epoch (the sampler's epoch must be restored before Lightning builds
the iterator); the shapes world (a map-style dataset) and litdata shards (a streaming dataset).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_internvl.components import Decoder, InternViT, InternViTConfig, PixelShuffleMLP
from lit_internvl.data import RecordsDataModule, ShapesDataModule
from lit_internvl.data.shapes import write_records
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.stages import SFTStage
from lit_internvl.tools.prepare import main as prepare_main

STEPS = 6  # 4 batches per epoch: steps 0-3 are epoch 0, 4-5 epoch 1


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
        self.names.append(batch["sample_names"])


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine can make a tiny step 30× slower; one is plenty here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stage() -> SFTStage:
    torch.manual_seed(0)
    # Drop-path draws from the global generator every step: the resumed run must draw the same.
    vision = InternViT(InternViTConfig.from_name("tiny", drop_path_rate=0.3))
    return SFTStage(
        vision=vision, connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=2,
    )  # fmt: skip


def _fit(make_data, root, kill_at=None, ckpt_path=None) -> Recorder:
    recorder = Recorder(kill_at)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, checkpoints],
    )  # fmt: skip
    try:
        trainer.fit(_stage(), make_data(), ckpt_path=ckpt_path)
    except Killed:
        assert kill_at is not None
    return recorder


def _shapes() -> ShapesDataModule:
    return ShapesDataModule(task="vqa", train_size=16, val_size=4, batch_size=4, system="Answer in one word.")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    jsonl = write_records(root, "conversation", count=8)
    prepare_main(["--input", str(jsonl), "--image-root", str(root), "--output", str(root / "shards")])
    return root / "shards"


def _check_resume(make_data, tmp_path, kill_at: int) -> None:
    uninterrupted = _fit(make_data, tmp_path / "a")
    killed = _fit(make_data, tmp_path / "b", kill_at=kill_at)
    assert len(killed.losses) == kill_at
    resumed = _fit(make_data, tmp_path / "b", ckpt_path="last")
    assert killed.losses + resumed.losses == uninterrupted.losses  # exact: same float32 numbers
    assert killed.names + resumed.names == uninterrupted.names
    for epoch in range(0, STEPS, 4):  # within an epoch no sample twice
        seen = [n for names in uninterrupted.names[epoch : epoch + 4] for n in names]
        assert len(seen) == len(set(seen))


@pytest.mark.parametrize("kill_at", [2, 4, 5], ids=["mid-epoch-0", "epoch-boundary", "mid-epoch-1"])
def test_killed_sft_run_on_shapes_resumes_exactly(tmp_path, kill_at):
    _check_resume(_shapes, tmp_path, kill_at)


def test_killed_sft_run_on_litdata_shards_resumes_exactly(tmp_path, shards):
    def records() -> RecordsDataModule:
        return RecordsDataModule(
            train=str(shards), tokens_per_tile=4, tile_size=56, max_tiles=1, use_thumbnail=False, batch_size=2,
            max_length=512, shuffle=True,
        )  # fmt: skip

    _check_resume(records, tmp_path, kill_at=5)


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
    assert [b["sample_names"] for b in resumed] == [b["sample_names"] for b in list(_shapes().train_dataloader())[1:]]
