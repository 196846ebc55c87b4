"""InternVL3.5-Flash's routing on two FSDP2 ranks (gloo): the router runs the vision tower outside the model's forward
to score the tiles, and FSDP2 gathers each vision block's parameters in that forward, a collective every rank must
join. A rank whose batch holds no image (a text-only sample of a mixture) joins it on the model's dummy tile, so the
run neither hangs nor fails; the ranks route as one process routes their batches.

NMP on the shapes documents (interleaved documents and text-only samples, 3 : 1), one sample a rank a step, a tiny
Flash connector with ``route: true``: some steps give one rank an image-free batch while the other routes its tiles.
Generation on the sharded model stops on every rank at once. And the router stage (ViR) under DDP, which it trains
with: a rank without images joins the gather of the loss ratios and the gradients' all-reduce."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_internvl.batch import Batch
from lit_internvl.components import Decoder, FlashConnector, InternViT
from lit_internvl.data import ShapesDataModule
from lit_internvl.distributed import leave_process_group
from lit_internvl.models.routing import route_prompts
from lit_internvl.stages import NMPStage, ViRStage
from tests.test_fsdp import _free_port

WORLD_SIZE, STEPS = 2, 6


def _stage(cls=NMPStage, **options):
    torch.manual_seed(0)  # the same initial weights in every process
    connector = partial(FlashConnector, downsample_ratio=0.5, router_heads=4, relative_threshold=0.3,
                        absolute_threshold=0.0, route=True)  # fmt: skip
    return cls(
        vision=partial(InternViT, config="tiny"), connector=connector, decoder=partial(Decoder, config="tiny-qwen3"),
        warmup_steps=1, **options,
    )  # fmt: skip


def _environment(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip


def _fit(stage, strategy, out_dir: str, routed: L.Callback) -> None:
    """``STEPS`` steps of one shapes document (or text-only sample) a rank."""
    data = ShapesDataModule(records="documents", tokenizer="shapes", train_size=32, val_size=4, batch_size=1)
    L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_steps=STEPS, default_root_dir=out_dir,
        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        enable_checkpointing=False, callbacks=[routed],
    ).fit(stage, data)  # fmt: skip


class Routed(L.Callback):
    """Each step's batch as the stage saw it, after routing: its tiles' budgets (None: no image)."""

    def __init__(self) -> None:
        self.budgets: list[list[int] | None] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        view: Batch = batch["conversation"]
        self.budgets.append(None if view.images is None else list(view.images.budgets))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _stop_early_on_rank_0(stage) -> dict:
    """Greedy generation and the rollouts' sampling on the sharded model, rank 0's row finished after one token (its
    end token is the token it draws first), rank 1's never (no end token): five steps on rank 1, one on rank 0."""
    from lit_internvl.distributed import unsharded, world
    from lit_internvl.inference.generate import generate
    from lit_internvl.inference.rollout import sample_groups

    model, prompt = stage.model, torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(prompt)
    rank = world()[0]
    with torch.no_grad(), unsharded(model):  # the root's parameters (embeddings, head) gathered, as the stages do
        first = generate(model, prompt, mask, max_new_tokens=1)[0][0]
        greedy = generate(model, prompt, mask, max_new_tokens=5, eos_id=first if rank == 0 else None)
        drawn = sample_groups(model, prompt, mask, None, [7], max_new_tokens=1)[0][0]
        sampled = sample_groups(model, prompt, mask, None, [7], max_new_tokens=5, eos_id=drawn if rank == 0 else None)
        # A prompt the stage has routed already (on_after_batch_transfer) on rank 0, a text-only one on rank 1: each
        # rank's generate makes the same vision passes.
        routed_prompt = _routed_prompt(model) if rank == 0 else route_prompts(model, prompt, mask, None)
        after_routing = generate(model, *routed_prompt[:2], routed_prompt[2], max_new_tokens=2)
    return {"first": first, "greedy": greedy, "drawn": drawn, "sampled": sampled, "after_routing": after_routing}


def _routed_prompt(model):
    """A prompt of one tile at the first budget, routed as the stage routes its prompt batches."""
    from lit_internvl.batch import Images
    from lit_internvl.data.tokenizer import IMG_CONTEXT, load_tokenizer

    budget, context = model.budgets()[0], load_tokenizer("shapes").token_to_id(IMG_CONTEXT)
    ids = torch.tensor([[5, *[context] * budget, 6]])
    tile = Images(torch.rand(1, 3, model.tile_size, model.tile_size), [1], [budget])
    return route_prompts(model, ids, torch.ones_like(ids), tile)


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    _environment(rank, port)
    routed, stage = Routed(), _stage()
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    strategy = ModelParallelStrategy(
        data_parallel_size=WORLD_SIZE, tensor_parallel_size=1, timeout=timedelta(seconds=60)
    )
    _fit(stage, strategy, out_dir, routed)
    sharded = type(stage.model.vision.layers[0].attn.qkv.weight).__name__
    result = {"budgets": routed.budgets, "losses": routed.losses, "sharded": sharded, **_stop_early_on_rank_0(stage)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    leave_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("flash_fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_a_rank_without_images_joins_the_routers_vision_pass(ranks):
    assert all(r["sharded"] == "DTensor" for r in ranks), "the vision blocks are FSDP2 units"
    assert all(len(r["budgets"]) == STEPS for r in ranks)
    steps = list(zip(*(r["budgets"] for r in ranks)))
    assert any((a is None) != (b is None) for a, b in steps), "a step where one rank has images and the other none"
    budgets = {b for step in steps for tiles in step if tiles is not None for b in tiles}
    assert budgets == {4, 1}, "the router compressed some tiles and kept others"
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def test_generation_on_a_sharded_model_stops_on_every_rank_at_once(ranks):
    """A rank whose rows are all finished keeps stepping (its rows padded with the end token, not returned) until every
    rank's are: each forward all-gathers the blocks' parameters on every rank."""
    first, rest = ranks
    assert first["greedy"] == [[first["first"]]] and first["sampled"] == [[first["drawn"]]]
    assert len(rest["greedy"][0]) == 5 and len(rest["sampled"][0]) == 5
    assert all(len(r["after_routing"][0]) == 2 for r in ranks)


def _router_worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    _environment(rank, port)
    routed, stage = Routed(), _stage(ViRStage, window=16)
    _fit(stage, DDPStrategy(timeout=timedelta(seconds=60)), out_dir, routed)
    router = {k: v.detach().clone() for k, v in stage.model.connector.router.state_dict().items()}
    torch.save({"budgets": routed.budgets, "router": router, "ratios_seen": int(stage.ratio_count)},
               Path(out_dir) / f"router{rank}.pt")  # fmt: skip
    leave_process_group()


def test_the_router_stage_trains_under_ddp_when_a_rank_has_no_image(tmp_path):
    mp.spawn(_router_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"router{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    steps = list(zip(*(r["budgets"] for r in ranks)))
    assert len(steps) == STEPS and any((a is None) != (b is None) for a, b in steps)
    tiles = sum(len(b) for step in steps for b in step if b is not None)
    assert ranks[0]["ratios_seen"] == ranks[1]["ratios_seen"] == tiles, "every rank's ratios, gathered on each"
    for name, value in ranks[0]["router"].items():  # DDP: the ranks' routers stay equal
        torch.testing.assert_close(ranks[1]["router"][name], value, rtol=0, atol=0)
