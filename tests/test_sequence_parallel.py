"""Sequence parallelism (Ulysses) on two CPU processes (gloo): a packed row split over a group of two ranks gives
the loss and the gradients of one process on the whole row.

The row packs interleaved documents (images, V2PE's fractional positions drawn at random) and text-only documents;
its 173 tokens are padded to 174 and split 87 / 87, so documents and images straddle the ranks. Every loss reduction
(token, sample, square — whose per-document counts span the ranks), the square one all-reduced, the logits head, the
hidden states, MPO's sequence log-probabilities and its DPO loss, RL's token log-probabilities (two answers a prompt,
the vision tower once a prompt), a row with one tile (the other rank runs the dummy
tile), a text-only row, and GPT-OSS's decoder (sinks, a sliding window shorter than the row, experts and their
load-balancing loss), and InternVL3.5-Flash's routed tiles (two budgets in one row, the vision features carried with
the images) are each compared with one process on the whole batch. The decoder of the first model has one
key/value head for four query heads, so the group of two repeats it. Then the same with FSDP2 on a (data parallel 1 ×
sequence parallel 2) mesh, with activation checkpointing, whose reduce-scatter averages the ranks' gradients itself;
and (slow) three NMP steps through the Trainer with ``SequenceParallelStrategy``.

Ranks' gradients are averaged over the group before the comparison (what FSDP2 and DDP do over a mesh that includes
the group: :mod:`lit_internvl.components.sequence_parallel`'s convention).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_internvl.batch import Batch
from lit_internvl.components import FlashConnector
from lit_internvl.components.sequence_parallel import SequenceParallel
from lit_internvl.data import ShapesDataModule
from lit_internvl.data.collate import Collator
from lit_internvl.data.shapes.datasets import ShapesInterleaved, ShapesText
from lit_internvl.data.shapes.world import ShapesWorld
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.distributed import leave_process_group
from lit_internvl.losses import (
    dpo_sigmoid_loss,
    language_model_loss,
    next_token_targets,
    reduce_token_losses,
    row_log_probs,
    supervised_positions,
)
from lit_internvl.models.routing import at_budgets
from lit_internvl.models.vlm import CrossEntropy, Logits
from tests.test_fsdp import _free_port
from tests.tiny import asked, tiny_vlm

SIZE = 2
MODELS = {"qwen3-one-kv-head": {"decoder": "tiny-qwen3", "num_kv_heads": 1}, "gpt-oss": {"decoder": "tiny-gpt-oss"}}
TOLERANCE = 1e-5


def _data():
    data = asked(ShapesDataModule(records="documents", tokenizer="shapes", v2pe="random"))
    world, builder = ShapesWorld(56), data.sample_builder(train=True)
    return data, ShapesInterleaved(world, 100, builder, (1, 3)), ShapesText(world, 100, builder)


def _batches() -> dict[str, Batch]:
    """The rows of every case: a packed row (5 documents, 8 tiles), one with a single tile, a text-only one, and two
    unpacked rows (MPO's chosen and rejected)."""
    data, docs, text = _data()
    pack = Collator(data.tokenizer.pad_id, data.views, pack=True, max_tokens=1024)
    unpacked = Collator(data.tokenizer.pad_id, data.views)
    plain = asked(ShapesDataModule(records="documents", tokenizer="shapes"))  # integer positions: routing renumbers
    plain_docs = ShapesInterleaved(ShapesWorld(56), 100, plain.sample_builder(train=True), (1, 3))
    return {
        "packed, integer positions": pack([plain_docs[0], text[0], plain_docs[1], plain_docs[2]])["conversation"],
        "packed": pack([docs[0], text[0], docs[1], text[1], docs[2]])["conversation"],
        "one tile": pack([text[2], docs[3], text[3]])["conversation"],
        "text only": pack([text[4], text[5], text[6]])["conversation"],
        "pair": unpacked([docs[1], docs[2]])["conversation"],
    }


def _model(name: str):
    context_id = _data()[0].tokenizer.token_to_id(IMG_CONTEXT)
    if name == "flash":  # InternVL3.5-Flash's connector on the tiny tower: 4 or 1 token(s) a 56 px tile
        model = tiny_vlm(context_id, decoder="tiny-qwen3")
        model.connector = FlashConnector(model.vision.hidden_size, model.decoder.hidden_size, router_heads=4)
        model.connector.mlp2.dropout.p = 0.0  # the released 0.1 draws other masks on a rank's share of the tiles
        return model
    config = dict(MODELS[name])
    return tiny_vlm(context_id, **config)


def _run(model, batch: Batch, head) -> torch.Tensor:
    return model(
        batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
        document_ids=batch.document_ids, head=head,
    )  # fmt: skip


def _cross_entropies(model, batch: Batch) -> torch.Tensor:
    return _run(model, batch, CrossEntropy(next_token_targets(batch.labels, batch.document_ids), chunk_size=16))


def _reduced(reduction: str, all_reduce: bool = False):
    def loss(model, batch):
        return reduce_token_losses(
            _cross_entropies(model, batch), batch.labels, batch.document_ids, reduction, all_reduce
        )

    return loss


def _logits(model, batch):
    logits = _run(model, batch, Logits(supervised_positions(batch.labels, batch.document_ids)))
    return language_model_loss(logits, batch.labels, batch.document_ids, "square")


def _hidden(model, batch):
    return _run(model, batch, None).square().mean()


def _mpo(model, batch):
    """MPO's sequence log-probabilities of two rows (chosen, rejected), through its DPO loss."""
    log_probs = row_log_probs(_cross_entropies(model, batch), batch.labels)
    reference = log_probs.detach() + torch.tensor([0.5, -0.5])  # rewards near the middle of the sigmoid
    return dpo_sigmoid_loss(log_probs[:1], log_probs[1:], reference[:1], reference[1:], beta=0.1).sum(), log_probs


def _rl(model, batch):
    """RL's loss pass: two answers a prompt in one forward, the vision tower once a prompt (``repeat_images``), the
    token log-probabilities from the logits at the answer positions."""
    g = 2
    ids, labels, positions, mask = (
        t.repeat_interleave(g, 0) for t in (batch.input_ids, batch.labels, batch.positions, batch.attention_mask)
    )
    at = supervised_positions(labels)
    logits = model(ids, batch.images, attention_mask=mask, positions=positions, head=Logits(at), repeat_images=g)
    targets = next_token_targets(labels)[at]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).mean()  # as GRPO's token mean


def _routed(model, batch):
    """InternVL3.5-Flash's routed batch: every other tile compressed to 1 token, the rows shortened to match
    (``at_budgets``), the vision features computed once and carried with the images (``Images.features``), as
    routing carries them."""
    images = batch.images
    budgets = [4 if i % 2 else 1 for i in range(len(images.budgets))]
    routed = replace(images, budgets=budgets, features=model.vision(images.pixel_values), routed=True)
    return _reduced("sample")(model, at_budgets(batch, routed, model.image_context_id))


def _with_aux(model, batch):
    loss = _reduced("square")(model, batch)
    return loss + model.decoder.aux_loss()


# (case, model, batch, loss)
CASES = [
    *[(f"{r}", "qwen3-one-kv-head", "packed", _reduced(r)) for r in ("token", "sample", "square")],
    ("square all-reduced", "qwen3-one-kv-head", "packed", _reduced("square", all_reduce=True)),
    ("logits head", "qwen3-one-kv-head", "packed", _logits),
    ("hidden states", "qwen3-one-kv-head", "packed", _hidden),
    ("mpo", "qwen3-one-kv-head", "pair", _mpo),
    ("rl log-probs", "qwen3-one-kv-head", "pair", _rl),
    ("one tile", "qwen3-one-kv-head", "one tile", _reduced("sample")),
    ("text only", "qwen3-one-kv-head", "text only", _reduced("square")),
    ("gpt-oss with aux loss", "gpt-oss", "packed", _with_aux),
    ("flash, routed tiles", "flash", "packed, integer positions", _routed),
]
FSDP_CASE = ("fsdp2 dp1×sp2, checkpointing", "qwen3-one-kv-head", "packed", _reduced("square"))


def _step(case, sequence_parallel=None, wrap=None) -> dict:
    """One forward and backward of ``case``: the loss, the extra outputs, every parameter's gradient (zeros for none)."""
    name, model_name, batch_name, loss_fn = case
    model = _model(model_name)
    if sequence_parallel is not None:
        model.sequence_parallel, model.dummy_tile = sequence_parallel, True
    if wrap is not None:
        model = wrap(model)
    batch = _batches()[batch_name]
    out = loss_fn(model, batch)
    loss, extra = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    grads = {}
    for param_name, param in model.named_parameters():
        grad = torch.zeros(param.shape) if param.grad is None else param.grad
        grads[param_name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()
    return {"loss": loss.detach(), "extra": None if extra is None else extra.detach(), "grads": grads}


ATTENTION_BACKENDS = ("eager", "sdpa", "flex")  # flex has no backward on a CPU: its forward is compared


def _split_attention(backend: str, group: SequenceParallel | None) -> torch.Tensor:
    """Attention over a 64-token row of three documents, four query heads sharing one key/value head, with sinks (not
    flex) and a sliding window of 12: the whole row's output, from this rank's slice when ``group`` is given."""
    from lit_internvl.components.attention import attention, make_mask

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, 64, 16, generator=g) for heads in (4, 1, 1))
    sinks = None if backend == "flex" else torch.randn(4, generator=g)
    documents = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14])
    mask = make_mask(backend, causal=True, document_ids=documents, window=12 if backend == "flex" else None)
    if group is None:
        return attention(q, k, v, mask, is_causal=True, backend=backend, sinks=sinks, window=12)
    columns = group.columns(64)
    q, k, v = (t[:, :, columns] for t in (q, k, v))
    out = attention(q, k, v, group.split_mask(mask), is_causal=True, backend=backend, sinks=sinks, window=12)
    whole = torch.zeros(1, 4, 64, 16)
    whole[:, :, columns] = out
    dist.all_reduce(whole)
    return whole


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lit_internvl.distributed import data_parallel_mesh, parallelize, sequence_parallel_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=SIZE)
    results = {}
    group = SequenceParallel()
    results["attention"] = {backend: _split_attention(backend, group) for backend in ATTENTION_BACKENDS}
    for case in CASES:
        got = _step(case, group)
        for grad in got["grads"].values():  # what FSDP2 or DDP does over the group
            dist.all_reduce(grad)
            grad /= SIZE
        results[case[0]] = got
    mesh = init_device_mesh("cpu", (1, SIZE), mesh_dim_names=("data_parallel", "sequence_parallel"))
    results[FSDP_CASE[0]] = _step(
        FSDP_CASE, sequence_parallel_group(mesh), lambda m: parallelize(m, data_parallel_mesh(mesh), True)
    )
    results["flex without a mask"] = _flex_hidden(SequenceParallel(dist.group.WORLD))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


def _flex_hidden(group: SequenceParallel | None) -> torch.Tensor:
    """The hidden states of a packed text-only row (26 tokens), no mask given (flex builds its causal block mask from
    the length), on the flex backend (its forward: flex has no CPU backward)."""
    context_id = _data()[0].tokenizer.token_to_id(IMG_CONTEXT)
    model = tiny_vlm(context_id, **MODELS["qwen3-one-kv-head"], attn_backend="flex")
    if group is not None:
        model.sequence_parallel, model.dummy_tile = group, True
    with torch.no_grad():
        return model(_batches()["text only"].input_ids[:, :64])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sequence_parallel")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=SIZE, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(SIZE)]


def test_flex_without_a_mask_is_built_for_the_whole_row(ranks):
    expected = _flex_hidden(None)
    for results in ranks:
        torch.testing.assert_close(results["flex without a mask"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_split_attention_is_the_whole_rows_attention(ranks, backend):
    """Documents, a sliding window, sinks (eager, sdpa) and one key/value head for four query heads (repeated for the
    group of two), on every backend the CPU runs."""
    expected = _split_attention(backend, None)
    for results in ranks:
        torch.testing.assert_close(results["attention"][backend], expected, atol=1e-6, rtol=1e-5)


def test_the_packed_row_is_split_across_documents_and_images():
    batch = _batches()["packed"]
    assert batch.input_ids.shape == (1, 173) and len(set(batch.document_ids[0].tolist())) == 5
    half = 87  # 174 / 2 after one padding token
    assert batch.document_ids[0, half - 1] == batch.document_ids[0, half], "a document straddles the ranks"
    assert batch.images.tiles_per_sample == [8] and batch.positions.frac().any(), "tiles, V2PE's fractions"


@pytest.mark.parametrize("case", [*CASES, FSDP_CASE], ids=lambda case: case[0])
def test_two_ranks_give_the_loss_and_gradients_of_one_process(ranks, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _step(case)
    finally:
        torch.set_num_threads(threads)
    assert any(grad.abs().max() > 1e-4 for grad in reference["grads"].values()), "the reference trains something"
    for rank, results in enumerate(ranks):
        got = results[case[0]]
        loss_difference = (got["loss"] - reference["loss"]).abs().item()
        grad_difference = max((got["grads"][k] - g).abs().max().item() for k, g in reference["grads"].items())
        print(f"{case[0]}, rank {rank}: |loss diff| {loss_difference:.1e}, max |grad diff| {grad_difference:.1e}")
        assert loss_difference <= TOLERANCE
        assert grad_difference <= TOLERANCE
        if reference["extra"] is not None:  # MPO's sequence log-probabilities
            assert (got["extra"] - reference["extra"]).abs().max().item() <= TOLERANCE


# -- through the Trainer: SequenceParallelStrategy, its sampler and the stage -------------------------------------

STEPS = 3


def _nmp():
    from lit_internvl.stages import NMPStage
    from tests.tiny import tiny_stage

    torch.manual_seed(0)  # the same initial weights in every process
    return tiny_stage(NMPStage, decoder="tiny-qwen3", warmup_steps=1)


def _documents() -> ShapesDataModule:
    return ShapesDataModule(
        records="documents", tokenizer="shapes", v2pe="random", pack=True, max_tokens=256, train_size=24, val_size=4,
        batch_size=8,
    )  # fmt: skip


def _fit(tmp: Path, **kwargs):
    import lightning as L

    from tests.test_fsdp import LossRecorder

    recorder, stage = LossRecorder(), _nmp()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, default_root_dir=tmp, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=[recorder], **kwargs,
    )  # fmt: skip
    trainer.fit(stage, _documents())
    return recorder.losses, stage


def _trainer_worker(rank: int, port: int, out_dir: str) -> None:
    from lit_internvl.distributed import SequenceParallelStrategy
    from tests.test_fsdp import _full_state

    torch.set_num_threads(1)
    os.environ.pop("PL_GLOBAL_SEED", None)  # as tests/test_nmp_fsdp.py
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(SIZE), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    strategy = SequenceParallelStrategy(sequence_parallel_size=SIZE)
    losses, stage = _fit(Path(out_dir), strategy=strategy, devices=SIZE)
    result = {
        "losses": losses, "weights": _full_state(stage.model), "split": repr(stage.model.sequence_parallel),
        "sharded": type(stage.model.decoder.layers[0].mlp.up_proj.weight).__name__,
    }  # fmt: skip
    torch.save(result, Path(out_dir) / f"trainer{rank}.pt")
    leave_process_group()  # everything is saved: leave without the interpreter's teardown


@pytest.mark.slow  # two Lightning processes and a third run: ~25 s on the 2-core machine
def test_nmp_with_the_sequence_parallel_strategy_trains_as_one_process(tmp_path):
    """Three steps of NMP on packed rows (V2PE random) with ``SequenceParallelStrategy(sequence_parallel_size=2)`` on
    two processes: the sampler gives both ranks the same rows, the stage splits them, FSDP2 shards over the flattened
    mesh; losses and weights are one process's."""
    from tests.test_fsdp import _max_difference

    mp.spawn(_trainer_worker, args=(_free_port(), str(tmp_path)), nprocs=SIZE, join=True)
    ranks = [torch.load(tmp_path / f"trainer{r}.pt", weights_only=True) for r in range(SIZE)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses, stage = _fit(tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    weights = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
    assert [r["split"] for r in ranks] == ["SequenceParallel(rank 0 of 2)", "SequenceParallel(rank 1 of 2)"]
    assert ranks[0]["sharded"] == "DTensor"
    loss_difference = max(abs(a - b) for a, b in zip(ranks[0]["losses"], losses, strict=True))
    weight_difference = _max_difference(ranks[0]["weights"], weights)
    print(f"max |loss diff| {loss_difference:.1e}, max |weight diff| {weight_difference:.1e}")
    assert loss_difference <= TOLERANCE
    assert weight_difference <= 0.05 * stage.hparams.learning_rate  # as tests/test_fsdp.py (AdamW at rounding level)
