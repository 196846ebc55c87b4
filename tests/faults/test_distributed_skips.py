"""A bad record on one rank of a two-process run (gloo, DDP): with one sample a rank a step, a skipped record would
leave that rank an empty batch, and Lightning stops a distributed run whose ``training_step`` skips. The record is
replaced by the next good one (as InternVL's dataset redraws) and still counted and named as skipped."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_internvl.data.shapes import write_records
from lit_internvl.distributed import leave_process_group
from lit_internvl.stages import SFTStage
from tests.test_fsdp import _free_port
from tests.tiny import records, tiny_stage

WORLD_SIZE, RECORDS = 2, 8
BAD = (1, 3)  # rank 1's first two samples (the sampler deals the unshuffled records alternately)


class Seen(L.Callback):
    def __init__(self) -> None:
        self.names: list[list[str]] = []
        self.skipped: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.names.append(list(batch.first.sample_names) if not batch.empty else [])
        self.skipped += batch.skipped_records


def _worker(rank: int, port: int, folder: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    torch.manual_seed(0)
    seen = Seen()
    data = records(train=str(Path(folder) / "records.jsonl"), tile_size=56, max_tiles=1, use_thumbnail=False,
                   batch_size=1, shuffle=False, max_length=512)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=DDPStrategy(timeout=timedelta(seconds=60)), max_epochs=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, default_root_dir=folder, callbacks=[seen],
    )  # fmt: skip
    trainer.fit(tiny_stage(SFTStage, decoder="tiny", warmup_steps=1), data)
    torch.save({"names": seen.names, "skipped": seen.skipped, "steps": trainer.global_step},
               Path(folder) / f"rank{rank}.pt")  # fmt: skip
    leave_process_group()


@pytest.mark.usefixtures("one_thread")
def test_a_bad_record_on_one_rank_is_replaced_and_counted(tmp_path):
    jsonl = write_records(tmp_path, "conversation", count=RECORDS)
    lines = jsonl.read_text().splitlines()
    for index in BAD:
        lines[index] = lines[index].replace("images/", "missing/")
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert [r["steps"] for r in ranks] == [RECORDS // WORLD_SIZE] * 2
    assert all(names for r in ranks for names in r["names"]), "no rank met an empty batch"
    skipped = ranks[1]["skipped"]
    assert [s["reason"] for s in skipped] == ["missing image"] * len(BAD)
    assert len({s["name"] for s in skipped}) == len(BAD) and not ranks[0]["skipped"]


def test_the_replacement_is_the_next_good_record_and_a_fixed_function_of_the_index():
    from lit_internvl.data.datasets import Redrawn

    good = {"name": "g", "views": {}}
    samples = [{"skipped": "bad", "name": "a"}, {"skipped": "bad", "name": "b"}, {**good, "name": "c"}, good]
    redrawn = Redrawn(samples, tries=2)
    assert redrawn[0] == {**good, "name": "c", "redrawn": [{"name": "a", "reason": "bad"}]} == redrawn[0]
    assert redrawn[3] is good and len(redrawn) == 4
    assert Redrawn(samples, tries=1)[0] == samples[0], "no good record within `tries`: the bad one, still a skip"
