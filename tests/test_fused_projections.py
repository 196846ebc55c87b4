"""Fused projections: q/k/v and gate/up by one matmul each give the decoder's outputs and gradients as the separate
maps do, keep every parameter name (so checkpoints, export and LoRA targets are unchanged), and leave LoRA-wrapped
projections to run one by one with their adapters."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lit_internvl.components import Decoder, LanguageConfig
from lit_internvl.components.language import set_fused_projections
from lit_internvl.components.layers import fused_linear
from lit_internvl.lora import add_lora, lora_disabled


def _decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(LanguageConfig.from_name("tiny", **overrides))


def _outputs_and_grads(decoder, ids):
    hidden = decoder(ids)
    loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum()
    names = [n for n, p in decoder.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for p in decoder.parameters() if p.requires_grad])
    return hidden.detach(), dict(zip(names, grads))


def test_fused_linear_equals_the_separate_maps():
    torch.manual_seed(0)
    layers = [nn.Linear(16, 24), nn.Linear(16, 8), nn.Linear(16, 8)]
    x = torch.randn(3, 5, 16)
    for got, layer in zip(fused_linear(x, layers), layers):
        torch.testing.assert_close(got, layer(x), atol=1e-6, rtol=0)
    mixed = [nn.Linear(16, 4), nn.Linear(16, 4, bias=False)]  # biases disagree: one by one
    for got, layer in zip(fused_linear(x, mixed), mixed):
        torch.testing.assert_close(got, layer(x))


def test_fused_decoder_equals_the_unfused_one_forward_and_backward():
    """With q/k/v biases (Qwen2's) and without; GQA (2 key/value heads for 4 query heads)."""
    for qkv_bias in (True, False):
        plain = _decoder(qkv_bias=qkv_bias)
        fused = set_fused_projections(copy.deepcopy(plain))
        assert fused.layers[0].self_attn.fuse_projections and fused.layers[0].mlp.fuse_projections
        assert list(fused.state_dict()) == list(plain.state_dict())  # checkpoints and export read the same names
        ids = torch.randint(0, 256, (2, 11))
        (hidden, grads), (fused_hidden, fused_grads) = _outputs_and_grads(plain, ids), _outputs_and_grads(fused, ids)
        torch.testing.assert_close(fused_hidden, hidden, atol=1e-5, rtol=0)
        for name, grad in grads.items():
            # float32 sums in another order: equal to a millionth of the gradient's scale
            torch.testing.assert_close(fused_grads[name], grad, atol=2e-6 * grad.abs().max(), rtol=0, msg=name)


class _Holder(nn.Module):
    """A decoder under the name ``decoder``, where LORA_TARGETS looks for it."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder


def test_lora_projections_run_with_their_adapters_when_fusion_is_on():
    """peft wraps q/k/v/gate/up: the fused path steps aside and the adapters act (their B made non-zero)."""
    holder = _Holder(_decoder()).eval()  # no LoRA dropout
    add_lora(holder, ["decoder"], r=2)
    for name, param in holder.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    ids = torch.randint(0, 256, (2, 9))
    with_adapters = holder.decoder(ids)
    with lora_disabled(holder):
        without = holder.decoder(ids)
    assert (with_adapters - without).abs().max() > 1e-3
    set_fused_projections(holder)
    torch.testing.assert_close(holder.decoder(ids), with_adapters)


def test_fused_decoder_logits_match_transformers_qwen2():
    """The parity test of tests/test_components.py with fusion on: transformers' Qwen2 on the same weights."""
    from tests.test_components import _qwen2_pair

    ours, theirs = _qwen2_pair("sdpa")
    set_fused_projections(ours)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours.head(ours(ids)), theirs(input_ids=ids).logits, rtol=0, atol=1e-4)
