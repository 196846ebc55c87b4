"""Claims about the mixture-of-experts MLP (``lit_internvl.components.moe``) against independent references:
transformers' own Qwen3-MoE block and ``load_balancing_loss_func`` with the same weights and logits, and every
experts backend against the loop over experts."""

from __future__ import annotations

import pytest
import torch

from lit_internvl.components.moe import MoEConfig, SparseMoE, grouped_mm_available, load_balancing_loss

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeSparseMoeBlock,
    load_balancing_loss_func,
)

HIDDEN, WIDTH, EXPERTS, TOP_K = 32, 16, 8, 3


def _moe(norm_topk_prob: bool = True, backend: str = "loop", seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    config = MoEConfig(EXPERTS, TOP_K, WIDTH, norm_topk_prob=norm_topk_prob, experts_backend=backend)
    moe = SparseMoE(HIDDEN, config)
    with torch.no_grad():
        moe.gate.weight.normal_(0.0, 0.5)  # routing far from uniform, so that the top-k matters
    return moe


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sparse_moe_equals_transformers_qwen3_moe_block(norm_topk_prob):
    ours = _moe(norm_topk_prob)
    config = Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        norm_topk_prob=norm_topk_prob,
    )  # fmt: skip
    config._experts_implementation = "eager"
    theirs = Qwen3MoeSparseMoeBlock(config)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected, "the parameter names are transformers' own"
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
        logits, _, _ = theirs.gate(x.view(-1, HIDDEN))
    torch.testing.assert_close(ours.router_logits, logits, rtol=0, atol=1e-6)


BACKENDS = ["padded"] + (["grouped_mm"] if grouped_mm_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_experts_equal_the_loop_over_experts_forward_and_backward(backend):
    """Output and every gradient (input, experts, router) of the batched paths equal the reference loop; the routing is
    lopsided (one expert takes most tokens, some none), as early in training."""
    results = {}
    shared = torch.randn(HIDDEN)
    x = torch.randn(3, 11, HIDDEN) + shared
    for name in ("loop", backend):
        moe = _moe(backend=name)
        with torch.no_grad():
            moe.gate.weight[2] += 0.5 * shared  # expert 2 is every token's first choice
        inputs = x.clone().requires_grad_()
        out = moe(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        counts = torch.bincount(moe.router_logits.topk(TOP_K).indices.flatten(), minlength=EXPERTS)
        results[name] = [
            out,
            inputs.grad,
            moe.experts.gate_up_proj.grad,
            moe.experts.down_proj.grad,
            moe.gate.weight.grad,
        ]
    assert counts.max() > 2 * counts.float().mean(), f"routing should be uneven, got {counts.tolist()}"
    for ours, reference in zip(results[backend], results["loop"], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_router_runs_in_float32_under_bfloat16_autocast():
    moe = _moe(backend="padded")
    x = torch.randn(2, 5, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert moe.router_logits.dtype == torch.float32
    torch.testing.assert_close(moe.router_logits, torch.nn.functional.linear(x.view(-1, HIDDEN), moe.gate.weight))
    assert out.dtype == torch.float32  # the block's input dtype


def _layers_of_logits(seed: int = 3) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2 * 6, EXPERTS, generator=generator) * 2 for _ in range(3))


def test_load_balancing_loss_equals_transformers_function():
    logits = _layers_of_logits()
    expected = load_balancing_loss_func(logits, EXPERTS, TOP_K)
    torch.testing.assert_close(load_balancing_loss(logits, EXPERTS, TOP_K), expected, rtol=1e-6, atol=0)
    # and with padding masked out: row 0 has 4 real tokens, row 1 all 6
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    expected_masked = load_balancing_loss_func(logits, EXPERTS, TOP_K, attention_mask=mask)
    got = load_balancing_loss(logits, EXPERTS, TOP_K, attention_mask=mask)
    torch.testing.assert_close(got, expected_masked, rtol=1e-6, atol=0)
    assert abs(expected_masked - expected) > 1e-4, "the mask changes the value: the check can fail"


def test_load_balancing_loss_is_one_for_uniform_routing_and_grows_when_lopsided():
    uniform = (torch.zeros(64, EXPERTS),)  # every probability 1/E; top-k by index, f = k/E on k experts
    assert load_balancing_loss(uniform, EXPERTS, 1).item() == pytest.approx(1.0)
    lopsided = torch.zeros(64, EXPERTS)
    lopsided[:, 0] = 10.0
    assert load_balancing_loss((lopsided,), EXPERTS, 1).item() > 7.0


def test_load_balancing_loss_gradient_reaches_the_router():
    moe = _moe()
    moe(torch.randn(2, 5, HIDDEN))
    load_balancing_loss([moe.router_logits], EXPERTS, TOP_K).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad is None, "the loss reads only the router"


def test_config_checks_and_layer_choice():
    config = MoEConfig(num_experts=4, top_k=2, intermediate_size=8, sparse_step=2, mlp_only_layers=[3])
    assert config.mlp_only_layers == (3,)
    assert [config.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]
    with pytest.raises(ValueError, match="top_k 5"):
        MoEConfig(num_experts=4, top_k=5, intermediate_size=8)
    with pytest.raises(ValueError, match="experts_backend"):
        MoEConfig(num_experts=4, top_k=2, intermediate_size=8, experts_backend="fast")
