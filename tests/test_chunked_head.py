"""The output head and cross-entropy in chunks (``linear_cross_entropy``) compute the unchunked loss and gradients
for every reduction, never keep a (N, vocab) tensor for backward, and give the SFT and MPO stages their old losses."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import lit_internvl.losses as losses_module
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.losses import (
    IGNORE_INDEX,
    REDUCTIONS,
    language_model_loss,
    linear_cross_entropy,
    next_token_targets,
    reduce_token_losses,
    row_log_probs,
    sequence_log_probs,
    supervised_positions,
)
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import CrossEntropy, Logits
from tests.tiny import tiny_vlm

CONTEXT = ByteTokenizer().token_to_id(IMG_CONTEXT)


def _packed(rows=3, length=40, dim=16, vocab=50, seed=0):
    """Hidden states, a head, labels with unsupervised stretches and packed document ids."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < 0.3] = IGNORE_INDEX
    document_ids = torch.cumsum(torch.rand(rows, length, generator=g) < 0.1, dim=1)
    return hidden, weight, labels, document_ids


def _both(hidden, weight, labels, document_ids, reduction, chunk_size, all_reduce=False):
    """(unchunked loss, its gradients), (chunked loss, its gradients) for the same inputs."""
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        supervised = supervised_positions(labels, document_ids)
        if chunked:
            targets = next_token_targets(labels, document_ids)[supervised]
            token_losses = linear_cross_entropy(h[supervised], w, targets, chunk_size=chunk_size)
            loss = reduce_token_losses(token_losses, labels, document_ids, reduction, all_reduce)
        else:
            loss = language_model_loss(h @ w.T, labels, document_ids, reduction, all_reduce)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [7, 1024])  # several chunks (the last one short), and one
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(reduction, chunk_size):
    (loss, grad_h, grad_w), (chunked, chunked_h, chunked_w) = _both(*_packed(), reduction, chunk_size)
    torch.testing.assert_close(chunked, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_h, grad_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_w, grad_w, atol=1e-5, rtol=0)
    assert grad_w.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunked_loss_with_all_reduce_equals_the_unchunked_one(reduction, monkeypatch):
    """With ``all_reduce`` on two ranks holding the same batch: the all-reduced weight is twice the local one."""
    monkeypatch.setattr(losses_module, "world", lambda: (0, 2))
    monkeypatch.setattr(losses_module.dist, "all_reduce", lambda tensor: tensor.mul_(2))
    (loss, grad_h, grad_w), (chunked, chunked_h, chunked_w) = _both(*_packed(seed=1), reduction, 5, all_reduce=True)
    torch.testing.assert_close(chunked, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_h, grad_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_w, grad_w, atol=1e-5, rtol=0)


def test_an_ignored_target_gives_zero_loss_and_no_gradient():
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.tensor([3, IGNORE_INDEX, 5, 19, IGNORE_INDEX, 0])
    out = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="none")  # 0 at ignore_index
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert hidden.grad[1].abs().max() == 0 and hidden.grad[4].abs().max() == 0 and hidden.grad[0].abs().max() > 0


def test_backward_keeps_no_tensor_of_the_vocabulary_width_but_the_head():
    """What autograd saves for backward holds a row's log-sum-exp, not its logits: no (N, V) tensor."""
    n, vocab = 64, 300
    hidden, weight = torch.randn(n, 16, requires_grad=True), torch.randn(vocab, 16, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, torch.randint(0, vocab, (n,)), chunk_size=16).sum().backward()
    assert shapes and not any(vocab in shape and shape != (vocab, 16) for shape in shapes), shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        F.cross_entropy(hidden @ weight.T, torch.randint(0, vocab, (n,)))  # the unchunked path does keep them
    assert (n, vocab) in shapes


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_stays_close():
    hidden, weight, labels, document_ids = _packed(seed=2)
    supervised = supervised_positions(labels, document_ids)
    targets = next_token_targets(labels, document_ids)[supervised]
    exact = linear_cross_entropy(hidden[supervised], weight, targets, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(hidden[supervised], weight, targets, chunk_size=8)
    assert low.dtype == torch.float32 and 0 < (low - exact).abs().max() < 0.1


def _vlm(vocab=None) -> VisionLanguageModel:
    return tiny_vlm(CONTEXT, **({} if vocab is None else {"vocab_size": vocab}))


def _vlm_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 30), generator=g)
    ids[:, 2:6] = CONTEXT  # one 56 px tile (4 tokens) a row
    labels = ids.masked_fill(ids == CONTEXT, IGNORE_INDEX)
    labels[:, :8] = IGNORE_INDEX
    document_ids = torch.tensor([[0] * 12 + [1] * 18, [0] * 30])
    document_ids[0, 12:] = 1
    ids[0, 12:] = torch.randint(0, 256, (18,), generator=g)  # the second document of row 0 is text
    labels[0, 12:] = ids[0, 12:]
    return ids, torch.randn(2, 3, 56, 56, generator=g), labels, document_ids


def test_model_cross_entropies_train_like_its_logits():
    """``model(..., head=CrossEntropy(...))`` → ``reduce_token_losses`` equals ``model(..., head=Logits(...))`` →
    ``language_model_loss``, loss and every parameter's gradient (the tied head and embeddings included)."""
    ids, pixels, labels, document_ids = _vlm_batch()
    grads = []
    for chunked in (False, True):
        model = _vlm()
        if chunked:
            out = model(ids, pixels, document_ids=document_ids,
                        head=CrossEntropy(next_token_targets(labels, document_ids), chunk_size=5))  # fmt: skip
            loss = reduce_token_losses(out, labels, document_ids, "square")
        else:
            out = model(ids, pixels, document_ids=document_ids, head=Logits(supervised_positions(labels, document_ids)))
            loss = language_model_loss(out, labels, document_ids, "square")
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, reference), (chunked, got) = grads
    torch.testing.assert_close(chunked, loss, atol=1e-5, rtol=0)
    assert reference.keys() == got.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_row_log_probs_of_model_cross_entropies_equal_sequence_log_probs():
    """The MPO path: each row's summed log-probability from the chunked cross-entropies."""
    ids, pixels, labels, _ = _vlm_batch()
    model = _vlm().eval()
    with torch.no_grad():
        expected = sequence_log_probs(model(ids, pixels, head=Logits()), labels)
        got = row_log_probs(model(ids, pixels, head=CrossEntropy(next_token_targets(labels), chunk_size=4)), labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_head_backend_is_refused():
    with pytest.raises(ValueError, match="Unknown head backend 'fused'"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), backend="fused")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["liger", "cce"])
def test_fused_kernel_backends_equal_ours(backend):
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[backend]
    if not torch.cuda.is_available() or importlib.util.find_spec(module) is None:
        pytest.skip(f"needs CUDA and {module}")
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(32000, 256, device="cuda", generator=g) / 16).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (3000,), device="cuda", generator=g)
    results = []
    for name in ("chunked", backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_cross_entropy(h, w, targets, backend=name)
        out.mean().backward()
        results.append((out.detach(), h.grad.float(), w.grad.float()))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(theirs, ours, atol=2e-2, rtol=2e-2)
