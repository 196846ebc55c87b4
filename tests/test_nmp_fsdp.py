"""FSDP2 on two CPU processes (gloo) where one rank only ever gets text-only batches and the other only
interleaved ones: every rank runs the vision encoder every step (a zero-weighted dummy tile on the text-only
rank), so no rank waits in a collective another skipped, and the run trains exactly what one process trains on
the two ranks' batches together."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.shapes.datasets import ShapesInterleaved, ShapesText
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.data.tokenizer import IMG_CONTEXT, load_tokenizer
from lit_internvl.data.views import View
from lit_internvl.distributed import leave_process_group
from lit_internvl.models.vlm import Logits
from lit_internvl.stages import NMPStage
from tests.test_fsdp import LossRecorder, _free_port, _full_state, _max_difference
from tests.tiny import asked

WORLD_SIZE, STEPS, PER_RANK = 2, 3, 2


def _stage() -> NMPStage:
    torch.manual_seed(0)  # the same initial weights in every process
    context_id = load_tokenizer("shapes").token_to_id(IMG_CONTEXT)
    return NMPStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"),
                    image_context_id=context_id, warmup_steps=1, all_reduce_loss=True)  # fmt: skip


def _samples(kind: str, step: int) -> list[dict]:
    data = asked(ShapesDataModule(records="documents", tokenizer="shapes", v2pe="random"))
    world, builder = ShapesWorld(56), data.sample_builder(train=True)
    split = ShapesText(world, 100, builder) if kind == "text" else ShapesInterleaved(world, 100, builder, (1, 2))
    return [split[step * PER_RANK + i] for i in range(PER_RANK)]


class FixedBatches(ShapesDataModule):
    """Each step's batch given in advance: rank 0 text-only, rank 1 interleaved (``ranks``), or both together."""

    def __init__(self, ranks: tuple[str, ...]) -> None:
        super().__init__(records="documents", tokenizer="shapes", v2pe="random")
        self.ranks = ranks

    def train_dataloader(self):
        collate = Collator(self.tokenizer.pad_id, self.views)
        batches = [collate([s for kind in self.ranks for s in _samples(kind, step)]) for step in range(STEPS)]
        return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def _trainer(tmp: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=STEPS, default_root_dir=tmp, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     use_distributed_sampler=False, **kwargs)  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    # An earlier test's seed_everything leaves PL_GLOBAL_SEED in the environment this rank inherits; Lightning's
    # distributed set-up would then re-seed from it before the stage builds its connector, unlike one process.
    os.environ.pop("PL_GLOBAL_SEED", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    recorder = LossRecorder()
    strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
    trainer = _trainer(Path(out_dir), strategy=strategy, devices=WORLD_SIZE, callbacks=[recorder])
    stage = _stage()
    trainer.fit(stage, FixedBatches((("text",), ("image",))[rank]))
    result = {"losses": recorder.losses, "weights": _full_state(stage.model), "dummy_tile": stage.model.dummy_tile}
    if rank == 0:
        torch.save(result, Path(out_dir) / "ranks.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("nmp_fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out / "ranks.pt", weights_only=True)


def test_text_only_and_image_ranks_train_as_one_process_on_both_batches(ranks, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recorder, stage = LossRecorder(), _stage()
        _trainer(tmp_path, callbacks=[recorder]).fit(stage, FixedBatches(("text", "image")))
    finally:
        torch.set_num_threads(threads)
    assert ranks["dummy_tile"] and not stage.model.dummy_tile, "on with two ranks, off with one"
    assert len(ranks["losses"]) == STEPS, "no rank hung: every step ran"
    loss_difference = max(abs(a - b) for a, b in zip(ranks["losses"], recorder.losses, strict=True))
    weights = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
    print(f"max |loss diff| {loss_difference:.2e}, max |weight diff| {_max_difference(ranks['weights'], weights):.2e}")
    assert loss_difference <= 1e-5
    assert _max_difference(ranks["weights"], weights) <= 0.05 * stage.hparams.learning_rate  # as tests/test_fsdp.py
    initial = _stage().build_model().state_dict()
    vision = [k for k in weights if k.startswith("vision.layers.0.")]
    assert any(not torch.equal(ranks["weights"][k], initial[k]) for k in vision), (
        "the vision encoder trained (on the image rank's gradients)"
    )


def test_the_dummy_tile_adds_nothing_to_the_loss_and_reaches_the_vision_gradients():
    from lit_internvl.losses import language_model_loss

    stage = _stage()
    model = stage.build_model()
    batch = Collator(0, (View("conversation", 4),))(_samples("text", 0))["conversation"]
    logits = model(batch.input_ids, None, head=Logits())
    model.dummy_tile = True
    with_tile = model(batch.input_ids, None, head=Logits())
    assert torch.equal(logits, with_tile)
    language_model_loss(with_tile, batch.labels).backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and not g.any() for g in grads), "every vision parameter gets a (zero) gradient"
