"""A validation metric on two processes (gloo) that only one rank updated: its ``compute()`` gathers over the ranks,
so both must call it (``updated_on_any_rank``), and both get the mean of every update."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MeanMetric

from lit_internvl.distributed import leave_process_group, updated_on_any_rank
from tests.test_fsdp import _free_port


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    metric, untouched = MeanMetric(), MeanMetric()
    if rank == 0:  # rank 1's validation shard held no such sample
        metric.update(torch.tensor([1.0, 0.0, 1.0]))
    value = metric.compute() if updated_on_any_rank(metric) else None
    skipped = not updated_on_any_rank(untouched)  # no rank updated it: no rank computes it
    torch.save({"value": value, "skipped": skipped}, Path(out_dir) / f"rank{rank}.pt")
    leave_process_group()


def test_a_metric_one_rank_updated_is_computed_on_both(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        torch.testing.assert_close(result["value"], torch.tensor(2 / 3))
        assert result["skipped"]
