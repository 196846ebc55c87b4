"""GPT-OSS's attention: learned sinks and sliding windows. The eager backend equals transformers'
``gpt_oss`` ``eager_attention_forward``; ``sdpa`` and ``flex`` equal eager on packed rows with padding (forward, and
backward where the backend has one on the CPU); ``varlen`` and ``xformers`` are refused when a model is built;
incremental decoding with a window equals the full forward; YaRN equals transformers' ``_compute_yarn_parameters``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GptOssConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss import modeling_gpt_oss

from lit_internvl.components import Decoder, LanguageConfig
from lit_internvl.components.attention import attention, causal_mask, make_mask, set_attention_backend
from lit_internvl.components.language import KVCache, SelfAttention
from lit_internvl.components.rotary import RopeScaling, RotaryEmbedding

# Row 0 packs documents of 5, 9 and 3 tokens then 3 padding tokens (id -1); row 1 is one document of 14 tokens
# and 6 padding tokens. The window (4) is shorter than every document but the last of row 0.
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 9 + [2] * 3 + [-1] * 3, [0] * 14 + [-1] * 6])
PADDING = (DOCUMENTS >= 0).long()
WINDOW = 4


def _inputs(heads=6, kv_heads=2, dim=12, seed=0, requires_grad=True):
    """q, k, v with grouped heads and a head_dim that is not a multiple of 8, and sinks of both signs."""
    g = torch.Generator().manual_seed(seed)
    batch, length = DOCUMENTS.shape
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    tensors = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(heads, generator=g) * 2]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _allowed(documents: torch.Tensor, padding: torch.Tensor, window: int | None) -> torch.Tensor:
    """``(B, 1, T, T)`` by the definition, token by token: same document, real key, causal, within the window."""
    batch, length = documents.shape
    allowed = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                inside = window is None or i - j < window
                same = documents[b, i] == documents[b, j]
                allowed[b, 0, i, j] = bool(same and padding[b, j] and j <= i and inside)
    return allowed


def _transformers_eager(q, k, v, sinks, allowed):
    """transformers' GPT-OSS eager attention (its additive mask: 0 where allowed, the dtype's minimum elsewhere)."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = q.shape[1] // k.shape[1], sinks
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, _ = modeling_gpt_oss.eager_attention_forward(module.eval(), q, k, v, bias, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # (B, T, H, D) → (B, H, T, D)


def _run(backend, window=WINDOW, backward=True):
    q, k, v, sinks = _inputs(requires_grad=backward)
    mask = make_mask(
        backend, causal=True, attention_mask=PADDING, document_ids=DOCUMENTS, window=window if backend == "flex" else None
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on the CPU warns that it runs unfused
        out = attention(q, k, v, mask, is_causal=True, backend=backend, sinks=sinks, window=window)
    out = out.masked_fill(~PADDING.bool()[:, None, :, None], 0.0)
    if not backward:
        return out, None
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * upstream).sum(), (q, k, v, sinks))


@pytest.mark.parametrize("window", [WINDOW, None])
def test_eager_equals_transformers_gpt_oss_eager_attention(window):
    q, k, v, sinks = _inputs(requires_grad=False)
    allowed = _allowed(DOCUMENTS, PADDING, window)
    expected = _transformers_eager(q, k, v, sinks, allowed)
    got, _ = _run("eager", window, backward=False)
    real = PADDING.bool()
    torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-6, rtol=0)


def test_the_sink_takes_weight_from_the_keys():
    """A large sink leaves the output near zero; a very negative one gives plain softmax attention."""
    q, k, v, _ = _inputs(requires_grad=False)
    heads = q.shape[1]
    strong = attention(q, k, v, is_causal=True, backend="eager", sinks=torch.full((heads,), 50.0))
    assert strong.abs().max() < 1e-12
    weak = attention(q, k, v, is_causal=True, backend="eager", sinks=torch.full((heads,), -1e4))
    torch.testing.assert_close(weak, attention(q, k, v, is_causal=True, backend="eager"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [WINDOW, None])
def test_sdpa_equals_eager_with_sinks_and_window_forward_and_backward(window):
    out, grads = _run("sdpa", window)
    ref, ref_grads = _run("eager", window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for got, expected in zip(grads, ref_grads):  # q, k, v and the sinks
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [WINDOW, None])
def test_flex_equals_eager_with_sinks_and_window_forward(window):
    out, _ = _run("flex", window, backward=False)  # flex has no backward on the CPU
    ref, _ = _run("eager", window, backward=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_sinks_and_window_equal_eager_on_a_gpu_forward_and_backward(backend):
    """On CUDA in bfloat16: sdpa's fused kernels with the extra key dimension, compiled flex with the gradient through
    its log-sum-exp."""
    results = {}
    for name in ("eager", backend):
        q, k, v, sinks = (t.detach().cuda().bfloat16().requires_grad_() for t in _inputs())
        mask = make_mask(
            name, causal=True, attention_mask=PADDING.cuda(), document_ids=DOCUMENTS.cuda(),
            window=WINDOW if name == "flex" else None,
        )  # fmt: skip
        out = attention(q, k, v, mask, is_causal=True, backend=name, sinks=sinks, window=WINDOW)
        out = out.masked_fill(~PADDING.cuda().bool()[:, None, :, None], 0.0)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
        results[name] = [out, *torch.autograd.grad((out * upstream).sum(), (q, k, v, sinks))]
    for got, expected in zip(results[backend], results["eager"], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=0)


def test_a_padding_query_with_sinks_outputs_zeros():
    q, k, v, sinks = _inputs(requires_grad=False)
    mask = make_mask("sdpa", causal=True, attention_mask=torch.zeros_like(PADDING))  # nothing real
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, mask, is_causal=True, backend=backend, sinks=sinks, window=WINDOW)
        assert torch.equal(out, torch.zeros_like(out)), backend


def test_the_window_counts_keys_in_the_cache_frame():
    """Query i of the last Tq sees the `window` latest keys up to its own position Tk - Tq + i."""
    mask = causal_mask(3, 10, window=4)
    assert [row.nonzero().flatten().tolist() for row in mask] == [[4, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9]]
    assert causal_mask(5, 5, window=2).sum(dim=1).tolist() == [1, 2, 2, 2, 2]


def _gpt_oss_like(**changes) -> LanguageConfig:
    fields = dict(
        vocab_size=97, hidden_size=40, num_layers=3, num_heads=5, num_kv_heads=1, head_dim=12, intermediate_size=56,
        rope_theta=150_000.0, qkv_bias=True, o_bias=True, attention_sinks=True, sliding_window=3,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"), attn_backend="eager",
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16, truncate=False),
    )  # fmt: skip
    return LanguageConfig(**{**fields, **changes})


@pytest.mark.parametrize("backend", ["varlen", "xformers"])
def test_backends_without_sinks_or_windows_are_refused_when_the_model_is_built(backend):
    with pytest.raises(ValueError, match=f"{backend!r} with learned attention sinks and a sliding window"):
        Decoder(_gpt_oss_like(attn_backend=backend))
    with pytest.raises(ValueError, match=f"{backend!r} with a sliding window"):
        Decoder(_gpt_oss_like(attn_backend=backend, attention_sinks=False))
    decoder = Decoder(_gpt_oss_like())
    with pytest.raises(ValueError, match=f"{backend!r} with learned attention sinks"):
        set_attention_backend(decoder, backend)
    assert all(layer.self_attn.attn_backend == "eager" for layer in decoder.layers)  # nothing half switched
    q, k, v, sinks = _inputs(requires_grad=False)
    with pytest.raises(ValueError, match="cannot run learned attention sinks"):
        attention(q, k, v, is_causal=True, backend=backend, sinks=sinks)
    Decoder(_gpt_oss_like(attn_backend=backend, attention_sinks=False, sliding_window=None, layer_types=None))


def test_decoder_layers_take_their_window_from_layer_types():
    decoder = Decoder(_gpt_oss_like())
    assert [layer.self_attn.window for layer in decoder.layers] == [3, None, 3]
    assert decoder.layers[0].self_attn.sinks.shape == (5,) and decoder.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(ValueError, match="marks no sliding layer"):
        _gpt_oss_like(layer_types=None)
    with pytest.raises(ValueError, match="3 entries for num_layers 2"):
        _gpt_oss_like(num_layers=2)


def _packed_positions(documents: torch.Tensor) -> torch.Tensor:
    positions = torch.zeros(documents.shape)
    for row in range(documents.shape[0]):
        for doc in documents[row].unique():
            where = documents[row] == doc
            positions[row, where] = torch.arange(int(where.sum()), dtype=torch.float32)
    return positions


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_decoder_with_sinks_and_windows_equals_eager_on_packed_rows(backend):
    torch.manual_seed(0)
    decoder = Decoder(_gpt_oss_like()).eval()
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    ids = torch.randint(0, 97, DOCUMENTS.shape)
    kwargs = dict(attention_mask=PADDING, positions=_packed_positions(DOCUMENTS), document_ids=DOCUMENTS)
    with torch.no_grad():
        reference = decoder(ids, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = set_attention_backend(decoder, backend)(ids, **kwargs)
    real = PADDING.bool()
    torch.testing.assert_close(got[real], reference[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_incremental_decoding_with_a_window_equals_the_full_forward(backend):
    """Prefill 5 tokens, then one token a step past the window (3): every step equals the full forward's row."""
    torch.manual_seed(0)
    decoder = Decoder(_gpt_oss_like(attn_backend=backend)).eval()
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
        ids, padding = torch.randint(0, 97, (2, 11)), torch.ones(2, 11, dtype=torch.long)
        padding[1, 9:] = 0
        full = decoder(ids, attention_mask=padding)
        cache = KVCache(len(decoder.layers))
        steps = [decoder(ids[:, :5], attention_mask=padding[:, :5], cache=cache)]
        for t in range(5, 9):
            steps.append(decoder(ids[:, t : t + 1], attention_mask=padding[:, : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :9], atol=1e-5, rtol=0)


def test_self_attention_equals_transformers_gpt_oss_attention():
    """One sliding layer with sinks, biases on q/k/v/o and YaRN rotary against transformers' GptOssAttention."""
    config = _gpt_oss_like()
    theirs_config = GptOssConfig(
        hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12, num_hidden_layers=3,
        sliding_window=3, layer_types=list(config.layer_types), attention_bias=True,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 150_000.0, "factor": 8.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        },
    )  # fmt: skip
    theirs_config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = modeling_gpt_oss.GptOssAttention(theirs_config, layer_idx=0).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.3)
    ours = SelfAttention(config, layer=0).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 40)
    positions = torch.arange(9).expand(2, -1)
    rotary = modeling_gpt_oss.GptOssRotaryEmbedding(theirs_config)
    allowed = _allowed(torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long), 3)
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = theirs(x, rotary(x, positions), bias)
        ours_rotary = RotaryEmbedding(12, 150_000.0, config.rope_scaling)
        got = ours(x, ours_rotary(positions), None, is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- YaRN ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (64, 150_000.0, dict(factor=32.0, original_max_position_embeddings=4096, truncate=False)),  # GPT-OSS
        (12, 10_000.0, dict(factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0)),
        (128, 1e6, dict(factor=2.0, original_max_position_embeddings=32768, attention_factor=1.5)),
    ],
)
def test_yarn_equals_transformers_compute_yarn_parameters(head_dim, theta, scaling):
    rope = {"rope_type": "yarn", "rope_theta": theta, **scaling}
    config = GptOssConfig(head_dim=head_dim, rope_parameters=rope, max_position_embeddings=131072)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours = RopeScaling(**scaling)
    assert torch.equal(ours.inv_freq(head_dim, theta), inv_freq)
    assert ours.scale == pytest.approx(attention_factor, abs=0)
    # cos and sin scaled by the attention factor, as GptOssRotaryEmbedding gives them (its halves, ours repeated)
    positions = torch.tensor([[0.0, 1.0, 7.0, 4000.0, 100_000.0]])
    cos, sin = modeling_gpt_oss.GptOssRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    our_cos, our_sin = RotaryEmbedding(head_dim, theta, ours)(positions)
    torch.testing.assert_close(our_cos[:, 0, :, : head_dim // 2], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_sin[:, 0, :, head_dim // 2 :], sin, atol=1e-6, rtol=0)


def test_yarn_leaves_fast_frequencies_and_divides_slow_ones():
    scaling = RopeScaling(factor=32.0, original_max_position_embeddings=4096, truncate=False)
    plain = RotaryEmbedding(64, 150_000.0).inv_freq
    scaled = scaling.inv_freq(64, 150_000.0)
    assert torch.equal(scaled[:3], plain[:3])
    torch.testing.assert_close(scaled[-3:], plain[-3:] / 32, atol=0, rtol=1e-6)
    assert scaling.scale == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)
