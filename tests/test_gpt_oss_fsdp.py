"""FSDP2 on two CPU processes (gloo) trains tiny-gpt-oss (sinks sharded with their block, sliding windows, the
biased router and experts) exactly as one process trains it on the whole batch, the load-balancing loss included;
gathered in bfloat16, its router (weight and bias) still computes in float32. The set-up is ``test_moe_fsdp.py``'s."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lit_internvl.components import Decoder, InternViT, LanguageConfig, PixelShuffleMLP
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.distributed import leave_process_group
from lit_internvl.stages import SFTStage
from tests.test_moe_fsdp import AUX_LOSS_COEF, GLOBAL_BATCH, WORLD_SIZE, _fit, _free_port


def _stage() -> SFTStage:
    torch.manual_seed(0)
    config = LanguageConfig.from_name("tiny-gpt-oss")
    config.moe.aux_loss_coef = AUX_LOSS_COEF
    return SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=Decoder(config),
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=1, all_reduce_loss=True,
    )  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lit_internvl.distributed import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    stage = _stage()
    strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
    recorder = _fit(stage, GLOBAL_BATCH // WORLD_SIZE, Path(out_dir), strategy=strategy, devices=WORLD_SIZE)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k: v.clone() for k, v in get_model_state_dict(stage.model, options=options).items()}

    torch.manual_seed(0)
    decoder = Decoder("tiny-gpt-oss")
    parallelize(decoder, stage.device_mesh["data_parallel"], param_dtype=torch.bfloat16)
    seen = {}
    decoder.layers[0].mlp.gate.register_forward_pre_hook(
        lambda module, args: seen.update(router=(module.weight.dtype, module.bias.dtype))
    )
    decoder(torch.randint(0, 300, (1, 40)))
    if rank == 0:
        torch.save({"losses": recorder.losses, "aux": recorder.aux, "weights": weights, "dtypes": seen},
                   Path(out_dir) / "fsdp.pt")  # fmt: skip
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


def test_fsdp2_on_two_ranks_trains_tiny_gpt_oss_as_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = _stage()
        one = _fit(stage, GLOBAL_BATCH, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    expected = {k: v.detach() for k, v in stage.model.state_dict().items()}
    assert got["dtypes"] == {"router": (torch.float32, torch.float32)}
    loss_difference = max(abs(a - b) for a, b in zip(got["losses"], one.losses, strict=True))
    aux_difference = max(abs(a - b) for a, b in zip(got["aux"], one.aux, strict=True))
    weight_difference = max((got["weights"][k].float() - expected[k].float()).abs().max().item() for k in expected)
    print(
        f"\nmax |loss diff| {loss_difference:.2e}, |aux diff| {aux_difference:.2e}, |weight diff| {weight_difference:.2e}"
    )
    assert loss_difference <= 1e-5 and aux_difference <= 1e-5
    assert weight_difference <= 0.05 * stage.hparams.learning_rate  # as test_fsdp.py (AdamW at rounding level)
    sinks = [k for k in expected if k.endswith("self_attn.sinks")]
    assert len(sinks) == 2 and all(not torch.equal(expected[k], torch.zeros_like(expected[k])) for k in sinks)
