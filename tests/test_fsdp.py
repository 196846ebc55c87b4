"""FSDP2 through ``ModelParallelStrategy`` on two CPU processes (gloo) trains exactly what one process
trains on the whole batch, with and without activation checkpointing, and its sharded checkpoint restores.

Each rank gets half of every global batch (the resumable sampler splits the same permutation across
ranks) and the SFT loss is normalised by the weight of the global batch (``all_reduce_loss``), so that
the mean of the ranks' gradients, which FSDP2's reduce-scatter computes, is the gradient of the
whole-batch loss. The mean of the per-rank losses is then the whole-batch loss.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.distributed import leave_process_group, parallelize, transformer_blocks, unsharded
from lit_internvl.models import DualEncoder
from lit_internvl.models.qllama import QLLaMAConnector
from lit_internvl.stages import SFTStage

WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 3  # two batches per epoch: the third step starts the second epoch


def _stage(activation_checkpointing: bool = False) -> SFTStage:
    torch.manual_seed(0)  # the same initial weights in every process
    stage = SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder("tiny"),
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=1, all_reduce_loss=True,
        activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    return stage


class LossRecorder(L.Callback):
    """The global-batch loss of every step: the mean of the ranks' losses."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(loss.item())


def _trainer(tmp: Path, max_steps: int = STEPS, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, default_root_dir=tmp, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **kwargs,
    )  # fmt: skip


def _data(batch_size: int) -> ShapesDataModule:
    return ShapesDataModule(
        records="questions", train_size=16, val_size=4, batch_size=batch_size, system="Answer in one word."
    )


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: FSDP2 runs with and without activation checkpointing (the first one writes a sharded
    checkpoint after step 2), then a fresh run that resumes from that checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    out = Path(out_dir)
    results = {}

    def fsdp(**kwargs) -> L.Trainer:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                          NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
        strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
        return _trainer(out / "runs", strategy=strategy, devices=WORLD_SIZE, **kwargs)

    for checkpointing in (False, True):
        recorder = LossRecorder()
        if checkpointing:
            trainer = fsdp(callbacks=[recorder])
        else:
            saver = ModelCheckpoint(dirpath=out / "sharded", every_n_train_steps=2, save_top_k=-1)
            trainer = fsdp(callbacks=[recorder, saver], enable_checkpointing=True)
        stage = _stage(checkpointing)
        trainer.fit(stage, _data(GLOBAL_BATCH // WORLD_SIZE))
        blocks = transformer_blocks(stage.model)
        results[f"checkpointing={checkpointing}"] = {
            "losses": recorder.losses,
            "weights": _full_state(stage.model),
            "sharded": all(type(block).__name__.startswith("FSDP") for _, block in blocks),
            "dtensor": type(stage.model.decoder.layers[0].mlp.up_proj.weight).__name__,
        }

    # A fresh run resumes from the sharded checkpoint of step 2 and trains step 3.
    restored, recorder = _stage(), LossRecorder()
    trainer = fsdp(callbacks=[recorder])
    checkpoint = next((out / "sharded").glob("*step=2*"))
    trainer.fit(restored, _data(GLOBAL_BATCH // WORLD_SIZE), ckpt_path=checkpoint)
    with unsharded(restored.model):  # an entry point other than forward, on the sharded model
        features = restored.model.embed_images(_pixels())
    results["restored"] = {
        "checkpoint": str(checkpoint),  # plain values only: read back with weights_only=True
        "losses": recorder.losses,
        "weights": _full_state(restored.model),
        "features": features,
    }
    if rank == 0:
        torch.save(results, out / "fsdp.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out / "fsdp.pt", weights_only=True) | {"folder": out}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: one process, the whole batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recorder, stage = LossRecorder(), _stage()
        _trainer(tmp_path_factory.mktemp("single"), callbacks=[recorder]).fit(stage, _data(GLOBAL_BATCH))
    finally:
        torch.set_num_threads(threads)
    return {"losses": recorder.losses, "weights": {k: v.detach().clone() for k, v in stage.model.state_dict().items()}}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_fsdp2_on_two_ranks_equals_one_process_on_the_whole_batch(fsdp_results, one_process, checkpointing):
    got = fsdp_results[f"checkpointing={checkpointing}"]
    assert got["sharded"] and got["dtensor"] == "DTensor", "every block is an FSDP2 unit with sharded parameters"
    assert len(got["losses"]) == STEPS
    loss_difference = max(abs(a - b) for a, b in zip(got["losses"], one_process["losses"], strict=True))
    weight_difference = _max_difference(got["weights"], one_process["weights"])
    print(
        f"checkpointing={checkpointing}: max |loss diff| {loss_difference:.2e}, max |weight diff| {weight_difference:.2e}"
    )
    assert loss_difference <= 1e-5
    # The ranks' gradients are summed in another order than one process sums them; AdamW divides each by its
    # own root mean square, so an element whose gradient is at rounding level can move by up to the learning
    # rate (1e-3) either way: equal training allows differences of that order in a few elements, not beyond.
    assert weight_difference <= 0.05 * _stage().hparams.learning_rate
    assert one_process["losses"][0] != one_process["losses"][1], "the first step changed the weights"


def test_sharded_checkpoint_restores_and_the_run_continues_exactly(fsdp_results):
    """Weights, optimiser, schedule, data position and random state all come back from the shards."""
    restored, trained = fsdp_results["restored"], fsdp_results["checkpointing=False"]
    folder = Path(restored["checkpoint"])
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == WORLD_SIZE, "one shard file per rank"
    assert restored["losses"] == trained["losses"][2:]
    assert _max_difference(restored["weights"], trained["weights"]) == 0.0
    plain = _stage().build_model()
    plain.load_state_dict(restored["weights"])
    with torch.no_grad():
        torch.testing.assert_close(restored["features"], plain.embed_images(_pixels()))


def test_blocks_are_found_in_every_model_by_name():
    """``layers`` lists anywhere: vision and decoder of the VLM, both towers of the dual encoder, and a
    QLLaMA connector's trunk."""
    vlm = _stage().build_model()
    names = [name for name, _ in transformer_blocks(vlm)]
    assert names == [f"vision.layers.{i}" for i in range(4)] + [f"decoder.layers.{i}" for i in range(2)]
    from lit_internvl.components import TextEncoder

    dual = DualEncoder(InternViT("tiny"), TextEncoder("tiny"))
    assert len(transformer_blocks(dual)) == 4 + 2
    connector = QLLaMAConnector(128, 128, language="tiny", num_queries=4)
    assert [n for n, _ in transformer_blocks(connector)] == ["qllama.layers.0", "qllama.layers.1"]


def test_activation_checkpointing_keeps_names_and_gradients():
    """Checkpointed blocks compute the same loss and gradients, under the same parameter names."""
    torch.manual_seed(0)
    model = _stage().build_model()
    plain = _stage().build_model()
    parallelize(model, activation_checkpointing=True)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, 256, (2, 24))
    ids[:, 2:6] = model.image_context_id
    pixels = torch.randn(2, 3, 56, 56)
    for m in (model, plain):
        m(ids, pixels).float().square().mean().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0, msg=name)


def test_activation_checkpointing_lowers_the_peak_memory_of_a_step_by_a_third(monkeypatch):
    """On a long, narrow decoder (activations dominate), measured in fresh processes as in
    ``benchmarks/activation_checkpointing.py``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "activation_checkpointing.py"
    spec = importlib.util.spec_from_file_location("activation_checkpointing", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plain, checkpointed = (benchmark.measure_in_subprocess(c, tokens=4096, layers=6) for c in (False, True))
    print(f"memory added by a step: {plain['added_bytes'] / 2**20:.0f} MiB plain, "
          f"{checkpointed['added_bytes'] / 2**20:.0f} MiB with activation checkpointing")  # fmt: skip
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert checkpointed["added_bytes"] <= 0.7 * plain["added_bytes"]


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "preset, strategy, checkpointing",
    [
        ("fsdp2.yaml", "FSDP2Strategy", False),
        ("fsdp2_checkpointing.yaml", "FSDP2Strategy", True),
        ("ddp.yaml", "DDPStrategy", False),
    ],
)
def test_strategy_presets_compose_with_a_recipe(preset, strategy, checkpointing):
    from lit_internvl.callbacks.throughput import TrainingThroughput
    from lit_internvl.cli import main

    configs = [REPO / "recipes/stage1.yaml", REPO / "recipes/strategies" / preset, REPO / "callbacks/monitoring.yaml"]
    args = [a for c in configs for a in ("--config", str(c))] + ["--trainer.devices", "1", "--trainer.logger", "false"]
    cli = main(args, run=False)
    assert type(cli.trainer.strategy).__name__ == strategy
    assert cli.model.hparams.activation_checkpointing is checkpointing
    assert any(isinstance(c, TrainingThroughput) for c in cli.trainer.callbacks)


@pytest.mark.parametrize("preset", ["fsdp_gpu.yaml", "fsdp2_checkpointing.yaml"])
def test_real_size_recipe_composes_with_the_gpu_presets(preset, monkeypatch, capsys):
    """The GPU presets cannot be instantiated here; the composed configuration must parse and resolve."""
    from lit_internvl.cli import main

    monkeypatch.setenv("INTERNVL_CHECKPOINT", "/path/to/InternVL3-1B")
    configs = [
        REPO / "recipes/internvl3_1b/sft_full.yaml",
        REPO / "recipes/strategies" / preset,
        REPO / "callbacks/monitoring.yaml",
    ]
    args = [a for c in configs for a in ("--config", str(c))] + [
        "--data.init_args.train",
        "train.jsonl",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lit_internvl.callbacks.throughput.TrainingThroughput" in printed
    if preset == "fsdp_gpu.yaml":
        assert "FSDPStrategy" in printed and "lit_internvl.distributed.BlockWrapPolicy" in printed
    else:
        assert "lit_internvl.distributed.FSDP2Strategy" in printed and "activation_checkpointing: true" in printed
