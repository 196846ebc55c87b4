"""FSDP2 on two CPU processes (gloo) trains the tiny mixture-of-experts model exactly as one process trains it on the
whole batch, the load-balancing loss included, fully and with LoRA on attention and experts, and keeps the router in
float32 when the rest is gathered in bfloat16.

As in ``test_fsdp.py``: each rank gets half of every global batch and ``all_reduce_loss`` normalises by the global
batch, for the language-model loss and for the load-balancing loss alike (whose expert shares and mean probabilities
are then global-batch ones), so that the mean of the ranks' gradients is the gradient of the whole-batch loss. The
aux coefficient is large here (0.1, not Qwen3's 0.001), so that a per-rank aux loss would show in the weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.distributed import leave_process_group
from lit_internvl.stages import SFTStage

WORLD_SIZE, GLOBAL_BATCH, STEPS = 2, 8, 3
AUX_LOSS_COEF = 0.1


# Full training, and LoRA (no dropout: the two runs would draw different masks) on the decoder, experts included.
RUNS = {"full": {}, "lora": {"trainable": ["connector"], "lora": {"parts": ["decoder"], "r": 4, "dropout": 0.0}}}


def _stage(run: str = "full") -> SFTStage:
    torch.manual_seed(0)
    config = LanguageConfig.from_name("tiny-moe")
    config.moe.aux_loss_coef = AUX_LOSS_COEF
    return SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder(config),
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=1, all_reduce_loss=True, **RUNS[run],
    )  # fmt: skip


class Recorder(L.Callback):
    """The global-batch loss and aux loss of every step: the means of the ranks' values."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.aux: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values = torch.stack([outputs["loss"].detach(), trainer.callback_metrics["train/aux_loss"].detach()])
        if trainer.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= trainer.world_size
        self.losses.append(values[0].item())
        self.aux.append(values[1].item())


def _fit(stage: SFTStage, batch_size: int, tmp: Path, **trainer) -> Recorder:
    recorder = Recorder()
    data = ShapesDataModule(
        records="questions", train_size=16, val_size=4, batch_size=batch_size, system="Answer in one word."
    )
    L.Trainer(
        accelerator="cpu", max_steps=STEPS, default_root_dir=tmp, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False, callbacks=[recorder], **trainer,
    ).fit(stage, data)  # fmt: skip
    return recorder


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lit_internvl.distributed import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    results = {}
    for run in RUNS:
        stage = _stage(run)
        strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
        recorder = _fit(stage, GLOBAL_BATCH // WORLD_SIZE, Path(out_dir), strategy=strategy, devices=WORLD_SIZE)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {k: v.clone() for k, v in get_model_state_dict(stage.model, options=options).items()}
        results[run] = {"losses": recorder.losses, "aux": recorder.aux, "weights": weights}
    experts = stage.model.decoder.layers[0].mlp.experts.get_base_layer()  # the LoRA run's, under its wrappers
    sharded = type(experts.gate_up_proj).__name__ == "DTensor" and experts.gate_up_proj.to_local().shape[0] == 4

    # Gathered in bfloat16, the router still computes from float32 weights.
    torch.manual_seed(0)
    decoder = Decoder("tiny-moe")
    parallelize(decoder, stage.device_mesh["data_parallel"], param_dtype=torch.bfloat16)
    seen = {}
    gate = decoder.layers[0].mlp.gate
    gate.register_forward_pre_hook(lambda module, args: seen.update(router=module.weight.dtype))
    decoder.layers[0].mlp.experts.register_forward_pre_hook(
        lambda module, args: seen.update(experts=module.gate_up_proj.dtype)
    )
    decoder(torch.randint(0, 300, (1, 9)))
    if rank == 0:
        torch.save({**results, "sharded": sharded, "dtypes": seen}, Path(out_dir) / "fsdp.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("moe_fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out / "fsdp.pt", weights_only=True)


def test_experts_are_sharded_and_the_router_is_gathered_in_float32(fsdp_results):
    assert fsdp_results["sharded"], "the stacked experts are sharded along the experts' dimension (8 over 2 ranks)"
    assert fsdp_results["dtypes"] == {"router": torch.float32, "experts": torch.bfloat16}


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_on_two_ranks_trains_the_moe_model_as_one_process(fsdp_results, tmp_path, run):
    got = fsdp_results[run]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = _stage(run)
        one = _fit(stage, GLOBAL_BATCH, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    expected = {k: v.detach() for k, v in stage.model.state_dict().items()}
    if run == "lora":
        assert any(".mlp.experts.lora_B" in k for k in expected) and expected.keys() == got["weights"].keys()
    loss_difference = max(abs(a - b) for a, b in zip(got["losses"], one.losses, strict=True))
    aux_difference = max(abs(a - b) for a, b in zip(got["aux"], one.aux, strict=True))
    weight_difference = max((got["weights"][k].float() - expected[k].float()).abs().max().item() for k in expected)
    print(
        f"\nmax |loss diff| {loss_difference:.2e}, |aux diff| {aux_difference:.2e}, |weight diff| {weight_difference:.2e}"
    )
    assert loss_difference <= 1e-5 and aux_difference <= 1e-5
    # As in test_fsdp.py: AdamW can move an element whose gradient is at rounding level by up to the learning rate.
    assert weight_difference <= 0.05 * stage.hparams.learning_rate
    assert one.aux[0] != one.aux[-1], "the routing changed"
