"""Regional compilation: compiled transformer blocks compute what the plain ones do (forward and backward), with
activation checkpointing too; padding the decoder's rows to a length multiple changes no output; a run over batches
of many lengths compiles a bounded number of graphs. The default run compiles with ``aot_eager`` (dynamo's capture
and AOT autograd, no code generation: seconds); the inductor check on the CPU is marked slow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.distributed import compile_blocks, parallelize
from lit_internvl.losses import next_token_targets, reduce_token_losses
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import CrossEntropy
from tests.tiny import tiny_vlm

CONTEXT = ByteTokenizer().token_to_id(IMG_CONTEXT)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _vlm() -> VisionLanguageModel:
    return tiny_vlm(CONTEXT, attn_backend="sdpa")


def _packed_batch(length: int, seed: int = 0):
    """One packed row of ``length`` tokens: a document with one 56 px tile (4 image tokens), then a text document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, length), generator=g)
    ids[0, 1:5] = CONTEXT
    split = length // 2
    documents = torch.tensor([[0] * split + [1] * (length - split)])
    positions = torch.cat([torch.arange(split), torch.arange(length - split)]).float()[None]
    labels = ids.masked_fill(ids == CONTEXT, IGNORE_INDEX)
    return ids, torch.randn(1, 3, 56, 56, generator=g), positions, documents, labels


def _step(model, batch, **options):
    """Loss and every parameter's gradient of one SFT step (chunked head + square-averaged loss)."""
    ids, pixels, positions, documents, labels = batch
    losses = model(ids, pixels, positions=positions, document_ids=documents,
                   head=CrossEntropy(next_token_targets(labels, documents)), **options)  # fmt: skip
    loss = reduce_token_losses(losses, labels, documents, "square")
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), grads


def _assert_same_step(model, reference, batch, atol=1e-5, **options):
    loss, grads = _step(model, batch, **options)
    ref_loss, ref_grads = _step(reference, batch)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=0)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_train_like_the_plain_ones(checkpointing):
    reference = _vlm()
    model = copy.deepcopy(reference)
    assert compile_blocks(model, backend="aot_eager") == len(model.vision.layers) + len(model.decoder.layers)
    model = parallelize(model, None, activation_checkpointing=checkpointing)
    _assert_same_step(model, reference, _packed_batch(40))
    assert counters["stats"]["unique_graphs"] >= 2  # a vision block and a decoder block were compiled


def test_padding_the_decoder_to_a_length_multiple_changes_nothing():
    model = _vlm()
    _assert_same_step(model, model, _packed_batch(37), length_multiple=16)  # 37 → 48 tokens, 11 of padding
    ids, pixels, positions, documents, _ = _packed_batch(37)
    padded = model(ids, pixels, positions=positions, document_ids=documents, length_multiple=16)
    assert padded.shape == model(ids, pixels, positions=positions, document_ids=documents).shape


def test_a_run_over_many_lengths_compiles_a_bounded_number_of_graphs():
    """Ten batches of ten lengths, padded to multiples of 32 (two buckets): automatic dynamic shapes compile each
    block at most twice (its first shapes, then symbolic ones), whatever the number of lengths."""
    model = _vlm()
    compile_blocks(model, backend="aot_eager")
    for step, length in enumerate(range(41, 91, 5)):
        _step(model, _packed_batch(length, seed=step), length_multiple=32)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 4, graphs  # vision block, decoder block: ≤ 2 each
    assert not counters["stats"].get("recompile_limit_hit")


@pytest.mark.slow
def test_inductor_compiled_blocks_train_like_the_plain_ones():
    reference = _vlm()
    model = copy.deepcopy(reference)
    compile_blocks(model)
    _assert_same_step(model, reference, _packed_batch(40), atol=1e-4)


def _fsdp_compiled_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: compiled blocks sharded by FSDP2 (as the GPU recipes run), one step on the batch."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _vlm()
    compile_blocks(model, backend="aot_eager")
    model = parallelize(model, init_device_mesh("cpu", (2,)))
    ids, pixels, positions, documents, labels = _packed_batch(40)  # the same batch on both ranks
    losses = model(
        ids,
        pixels,
        positions=positions,
        document_ids=documents,
        head=CrossEntropy(next_token_targets(labels, documents)),
    )
    loss = reduce_token_losses(losses, labels, documents, "square")
    loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # FSDP2 averaged the two ranks'
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_under_fsdp2_train_like_one_plain_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp_compiled.pt"
    mp.spawn(_fsdp_compiled_worker, args=(port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    reference = _vlm()
    ref_loss, ref_grads = _step(reference, _packed_batch(40))
    torch.testing.assert_close(got["loss"], ref_loss, atol=1e-5, rtol=0)
    for (name, _), expected in zip(reference.named_parameters(), ref_grads):
        torch.testing.assert_close(got["grads"][name], expected, atol=1e-5, rtol=1e-4, msg=name)
