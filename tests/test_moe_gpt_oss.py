"""GPT-OSS's mixture of experts (``MoEConfig(style="gpt_oss")``) against transformers' ``GptOssMLP`` with the same
weights (its experts transposed), the clamped SwiGLU against its formula, and the batched experts against the loop."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

from lit_internvl.components.moe import MoEConfig, SparseMoE, _clamped_swiglu, grouped_mm_available

HIDDEN, WIDTH, EXPERTS, TOP_K, LIMIT = 24, 12, 6, 3, 2.5  # widths of 16-byte rows for grouped_mm on CPUs


def _moe(backend: str = "loop", seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    config = MoEConfig(EXPERTS, TOP_K, WIDTH, style="gpt_oss", swiglu_limit=LIMIT, experts_backend=backend)
    moe = SparseMoE(HIDDEN, config)
    with torch.no_grad():  # large enough that the clamp bites on both sides
        for param in moe.parameters():
            param.normal_(0.0, 0.6)
    return moe


def test_clamped_swiglu_follows_its_formula_on_interleaved_rows():
    gate_up = torch.tensor([[-9.0, 9.0, 1.0, -0.5, 9.0, -9.0]])  # (g, u) pairs: (-9, 9), (1, -0.5), (9, -9)
    alpha, limit = 1.702, 7.0
    expected = []
    for g, u in ((-9.0, 9.0), (1.0, -0.5), (9.0, -9.0)):
        g, u = min(g, limit), max(min(u, limit), -limit)
        expected.append((u + 1) * g * torch.sigmoid(torch.tensor(alpha * g)).item())
    torch.testing.assert_close(_clamped_swiglu(gate_up, alpha, limit), torch.tensor([expected]), atol=1e-6, rtol=0)


def test_gpt_oss_moe_equals_transformers_gpt_oss_mlp():
    ours = _moe()
    config = GptOssConfig(
        hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        swiglu_limit=LIMIT,
    )  # fmt: skip
    config._experts_implementation = "eager"
    theirs = GptOssMLP(config).eval()
    experts = ours.experts
    theirs.load_state_dict(
        {
            "router.weight": ours.gate.weight, "router.bias": ours.gate.bias,
            "experts.gate_up_proj": experts.gate_up_proj.transpose(1, 2),  # (E, H, 2I)
            "experts.gate_up_proj_bias": experts.gate_up_proj_bias,
            "experts.down_proj": experts.down_proj.transpose(1, 2),  # (E, I, H)
            "experts.down_proj_bias": experts.down_proj_bias,
        },
        strict=True,
    )  # fmt: skip
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        expected, _ = theirs(x)
        got = ours(x)
        logits, _, _ = theirs.router(x.view(-1, HIDDEN))
        gate_up = x.view(-1, HIDDEN) @ theirs.experts.gate_up_proj[0] + theirs.experts.gate_up_proj_bias[0]
    assert (gate_up[:, ::2] > LIMIT).any() and (gate_up[:, 1::2].abs() > LIMIT).any(), "the clamp should bite"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.router_logits, logits, atol=1e-6, rtol=0)


BACKENDS = ["padded"] + (["grouped_mm"] if grouped_mm_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gpt_oss_experts_equal_the_loop_forward_and_backward(backend):
    results = {}
    x = torch.randn(3, 7, HIDDEN)
    for name in ("loop", backend):
        moe = _moe(name)
        inputs = x.clone().requires_grad_()
        out = moe(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = [out, inputs.grad] + [p.grad for p in moe.parameters()]
    assert len(results["loop"]) == 2 + 6  # router weight and bias, experts' two weights and two biases
    for ours, reference in zip(results[backend], results["loop"], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_gpt_oss_style_refuses_unnormalised_top_k():
    with pytest.raises(ValueError, match="norm_topk_prob must be true"):
        MoEConfig(EXPERTS, TOP_K, WIDTH, style="gpt_oss", norm_topk_prob=False)
