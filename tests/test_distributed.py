"""``contrastive_loss`` on two processes is the loss of one process on the concatenated batch.

Data-parallel training as DDP does it: every rank holds the same tiny towers (same seed), embeds its
own half of a fixed batch, computes its *local* loss, backpropagates, and the parameter gradients are
averaged over ranks (``all_reduce`` / world size). The mean of the per-rank losses and the averaged
gradients must then equal the loss and the gradients of a single process on the whole batch. A
negative control — the same run with each rank scoring only its own batch (no gather) — must differ,
which shows that the comparison can fail.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import lit_internvl.losses as losses
from lit_internvl.losses import contrastive_loss

WORLD_SIZE = 2
LOCAL_BATCH = 4
IMAGE_DIM, TEXT_DIM, EMBED_DIM = 8, 6, 5
DTYPES = (torch.float32, torch.float64)


class Towers(nn.Module):
    """A CLIP in miniature: one linear tower per modality and a learnable log logit scale."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank and in the reference process
        self.image = nn.Linear(IMAGE_DIM, EMBED_DIM).to(dtype)
        self.text = nn.Linear(TEXT_DIM, EMBED_DIM).to(dtype)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=dtype))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image_emb = F.normalize(self.image(images), dim=-1)
        text_emb = F.normalize(self.text(texts), dim=-1)
        return contrastive_loss(image_emb, text_emb, self.log_scale.exp())


def _batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch, ``WORLD_SIZE × LOCAL_BATCH`` pairs."""
    g = torch.Generator().manual_seed(1234)
    n = WORLD_SIZE * LOCAL_BATCH
    # Scaled up so that the logits are spread and the gradients are far from zero.
    return (torch.randn(n, IMAGE_DIM, generator=g) * 3).to(dtype), (torch.randn(n, TEXT_DIM, generator=g) * 3).to(dtype)


def _step(dtype: torch.dtype, rows: slice | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward of fresh towers on ``rows`` of the batch; returns (loss, grads)."""
    model = Towers(dtype)
    images, texts = _batch(dtype)
    if rows is not None:
        images, texts = images[rows], texts[rows]
    loss = model(images, texts)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    """Module level, so that ``spawn`` can pickle it."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for gather in (True, False):
            if not gather:
                # Negative control: each rank scores its own pairs only, as if single-process.
                losses.world = lambda: (0, 1)
            for dtype in DTYPES:
                loss, grads = _step(dtype, rows)
                # What DDP does: average the loss (for logging) and the gradients over ranks.
                dist.all_reduce(loss)
                loss /= world_size
                for grad in grads.values():
                    dist.all_reduce(grad)
                    grad /= world_size
                results[f"gather={gather}/{dtype}"] = {"loss": loss, **grads}
        losses.world = lambda: (dist.get_rank(), dist.get_world_size())
        # Unequal local batches (rank 1 lost a bad record): each rank's loss over its rows against every rank's.
        images, texts = _batch(torch.float64)
        rows = slice(0, LOCAL_BATCH) if rank == 0 else slice(LOCAL_BATCH, 2 * LOCAL_BATCH - 1)
        results["unequal"] = {"loss": Towers(torch.float64)(images[rows], texts[rows]).detach()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the 2-process job once and load what every rank wrote."""
    tmp = tmp_path_factory.mktemp("ddp")
    init_method = (tmp / "rendezvous").resolve().as_uri()
    assert not dist.is_initialized()  # the reference below must be single-process
    mp.spawn(_worker, args=(WORLD_SIZE, init_method, str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_ranks_equal_one_process_on_concatenated_batch(ranks, dtype):
    ref_loss, ref_grads = _step(dtype)
    tol = _tolerance(dtype)
    for r, results in enumerate(ranks):
        got = results[f"gather=True/{dtype}"]
        assert got["loss"].dtype == dtype
        torch.testing.assert_close(got["loss"], ref_loss, **tol, msg=lambda m, r=r: f"rank {r} loss: {m}")
        assert set(got) - {"loss"} == set(ref_grads)
        for name, ref in ref_grads.items():
            assert ref.abs().max() > 1e-3, f"{name}: reference gradient vanishes, the test would prove nothing"
            torch.testing.assert_close(
                got[name], ref, **tol, msg=lambda m, r=r, name=name: f"rank {r} grad of {name}: {m}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_without_gather_differs(ranks, dtype):
    """Scoring only the local batch loses the cross-rank negatives: loss and gradients change."""
    ref_loss, ref_grads = _step(dtype)
    for results in ranks:
        got = results[f"gather=False/{dtype}"]
        # Fewer negatives per row → a smaller loss.
        assert got["loss"] < ref_loss - 1e-3
        for name, ref in ref_grads.items():
            assert not torch.allclose(got[name], ref, atol=1e-4, rtol=1e-3), f"grad of {name} unchanged without gather"


def test_local_halves_alone_do_not_sum_to_global_loss():
    """Sanity for the reference: the full-batch loss is not just the mean of the halves' losses."""
    ref_loss, _ = _step(torch.float64)
    halves = [_step(torch.float64, slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH))[0] for r in range(WORLD_SIZE)]
    assert not torch.isclose(torch.stack(halves).mean(), ref_loss)


def test_ranks_with_unequal_batches_score_every_real_pair_of_the_others(ranks):
    """Rank 0 holds 4 pairs, rank 1 three: each rank's loss is that of its rows against the 7 real pairs (by hand)."""
    model = Towers(torch.float64)
    images, texts = _batch(torch.float64)
    keep = list(range(2 * LOCAL_BATCH - 1))
    with torch.no_grad():
        image_emb = F.normalize(model.image(images[keep]), dim=-1)
        text_emb = F.normalize(model.text(texts[keep]), dim=-1)
        logits = model.log_scale.exp() * image_emb @ text_emb.T
    for rank, rows in enumerate((range(0, LOCAL_BATCH), range(LOCAL_BATCH, 2 * LOCAL_BATCH - 1))):
        rows = list(rows)
        expected = (
            F.cross_entropy(logits[rows], torch.tensor(rows)) + F.cross_entropy(logits.T[rows], torch.tensor(rows))
        ) / 2
        torch.testing.assert_close(ranks[rank]["unequal"]["loss"], expected)
