"""RLStage on two CPU processes under FSDP2 (gloo): each rank's rollouts of its own prompts give the update one
process makes on the combined rollouts (the loss normalised by the global count of answers, all-reduced)."""

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
from lit_internvl.data.tokenizer import IMG_CONTEXT, load_tokenizer
from lit_internvl.distributed import leave_process_group
from lit_internvl.rewards import Reward
from lit_internvl.stages import RLStage
from tests.test_fsdp import _free_port, _full_state, _max_difference

WORLD_SIZE, STEPS, PROMPTS, GROUP = 2, 2, 4, 3


class FixedAnswers:
    """A rollout engine that answers each prompt (by name) with the same G token lists on any rank: the test
    compares updates, not samplings."""

    def sample(self, model, batch, seeds, **sampling):
        out = []
        for name in batch.sample_names:
            g = torch.Generator().manual_seed(int(name.split(":")[1]))
            for k in range(GROUP):
                length = 2 + k + int(torch.randint(3, (1,), generator=g))
                out.append(torch.randint(300, 390, (length,), generator=g).tolist() + [sampling["eos_id"]])
        return out


class LengthReward(Reward):
    """A reward that differs within a group: the answer's length in characters, over 10."""

    def __call__(self, answer, reference, meta) -> float:
        return len(answer) / 10


class SGDStage(RLStage):
    """Plain SGD, so that the weights' change is the gradient itself (AdamW's division by each element's root mean
    square turns rounding-level gradient differences into steps of the learning rate's size)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _stage(algorithm: str) -> RLStage:
    torch.manual_seed(0)
    context = load_tokenizer("shapes").token_to_id(IMG_CONTEXT)
    return SGDStage(vision=InternViT("tiny"), connector=PixelShuffleMLP, decoder=Decoder("tiny-shapes"),
                   image_context_id=context, rewards=[LengthReward()], rollout_engine=FixedAnswers(),
                   algorithm=algorithm, group_size=GROUP, mini_batches=2, micro_batches=2, all_reduce_loss=True,
                   learning_rate=1e-3, warmup_steps=1)  # fmt: skip


class Prompts(ShapesDataModule):
    """Each step's prompts given in advance: ``rows`` of every step's PROMPTS, in that order."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(records="questions", tokenizer="shapes", system="")
        self.rows = rows

    def train_dataloader(self):
        dataset = self._dataset("train", 100, self.views)  # the stage asked for prompts
        collate = Collator(self.tokenizer.pad_id, self.views)
        batches = [collate([dataset[s * PROMPTS + i] for i in self.rows]) for s in range(STEPS)]
        return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)

    def val_dataloader(self):
        return []


def _trainer(tmp: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=STEPS * 2, default_root_dir=tmp, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     limit_val_batches=0, use_distributed_sampler=False, **kwargs)  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    # An earlier test's seed_everything leaves PL_GLOBAL_SEED in the environment this rank inherits; Lightning's
    # distributed set-up would then re-seed from it before the stage builds its connector, unlike one process.
    os.environ.pop("PL_GLOBAL_SEED", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    results = {}
    for algorithm in ("gspo", "grpo"):
        strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
        trainer = _trainer(Path(out_dir), strategy=strategy, devices=WORLD_SIZE)
        stage = _stage(algorithm)
        trainer.fit(stage, Prompts([[0, 1], [2, 3]][rank]))
        results[algorithm] = _full_state(stage.model)
    if rank == 0:
        torch.save(results, Path(out_dir) / "ranks.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rl_ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out / "ranks.pt", weights_only=True)


@pytest.mark.parametrize("algorithm", ["gspo", "grpo"])
def test_two_ranks_make_the_update_of_one_process_on_the_combined_rollouts(ranks, algorithm, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = _stage(algorithm)
        # Mini-batch k of the global rollout is each rank's k-th prompt: prompts 0 and 2, then 1 and 3.
        _trainer(tmp_path).fit(stage, Prompts([0, 2, 1, 3]))
    finally:
        torch.set_num_threads(threads)
    assert stage.global_step == STEPS * 2, "two mini-batches a rollout, one optimiser step each"
    weights = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
    initial = _stage(algorithm).build_model().state_dict()
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights if k.startswith("decoder."))
    difference = _max_difference(ranks[algorithm], weights)
    print(f"{algorithm}: max |weight diff| {difference:.2e} (the update moved weights by up to {moved:.2e})")
    assert moved > 1e-4
    assert difference <= 1e-5
