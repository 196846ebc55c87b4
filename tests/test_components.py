"""Claims about the plain ``nn.Module`` parts in ``lit_internvl.components``.

Each test checks one component against an independent reference: a naive loop, a hand-written
formula, OpenGVLab's original code (written inline), or transformers' implementation of the same
architecture with the weights copied over.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lit_internvl.components import (
    Decoder,
    InternViT,
    InternViTConfig,
    LanguageConfig,
    PixelShuffleMLP,
    TextEncoder,
    attention,
    pixel_shuffle,
)
from lit_internvl.components.attention import causal_mask
from lit_internvl.components.layers import DropPath

transformers = pytest.importorskip("transformers")
from transformers import InternVLVisionConfig, InternVLVisionModel, Qwen2Config, Qwen2ForCausalLM  # noqa: E402


def _seed(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# 1. Pixel shuffle and the PixelShuffleMLP connector
# --------------------------------------------------------------------------------------------------


def _naive_pixel_shuffle_2x2(grid: torch.Tensor) -> torch.Tensor:
    n, height, width, channels = grid.shape
    out = torch.empty(n, height // 2, width // 2, 4 * channels, dtype=grid.dtype)
    for b in range(n):
        for i in range(height // 2):
            for j in range(width // 2):
                cells = [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)]
                out[b, i, j] = torch.cat([grid[b, r, c] for r, c in cells])
    return out


def _internvl_reference_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """OpenGVLab InternVL ``InternVLChatModel.pixel_shuffle`` with ps_version "v2", verbatim."""
    n, w, h, c = x.size()
    # N, W, H, C --> N, W, H * scale, C // scale
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    # N, W, H * scale, C // scale --> N, H * scale, W, C // scale
    x = x.permute(0, 2, 1, 3).contiguous()
    # N, H * scale, W, C // scale --> N, H * scale, W * scale, C // (scale ** 2)
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()  # ps_version v2
    return x


@pytest.mark.parametrize("side", [4, 6])
def test_pixel_shuffle_puts_2x2_neighbourhood_in_output_cell(side):
    _seed()
    grid = torch.randn(2, side, side, 3)
    out = pixel_shuffle(grid, 2)
    assert out.shape == (2, side // 2, side // 2, 12)
    torch.testing.assert_close(out, _naive_pixel_shuffle_2x2(grid), rtol=0, atol=0)


def test_pixel_shuffle_on_non_square_grid_keeps_rows_and_columns_apart():
    _seed()
    grid = torch.randn(1, 4, 6, 3)  # 4 rows, 6 columns
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 2, 3, 12)
    torch.testing.assert_close(out, _naive_pixel_shuffle_2x2(grid), rtol=0, atol=0)


@pytest.mark.parametrize("side", [4, 6, 32])
def test_pixel_shuffle_equals_internvl_v2_reference_formula(side):
    _seed()
    # InternVL reshapes ViT features to (n, rows, cols, c) before calling its pixel_shuffle.
    grid = torch.randn(2, side, side, 5)
    torch.testing.assert_close(pixel_shuffle(grid, 2), _internvl_reference_pixel_shuffle(grid, 0.5), rtol=0, atol=0)


def test_pixel_shuffle_rejects_grid_not_divisible_by_factor():
    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 5, 5, 3), 2)


def test_pixel_shuffle_mlp_turns_448px_tile_features_into_256_tokens():
    _seed()
    connector = PixelShuffleMLP(vision_dim=8, text_dim=16)
    assert connector.tokens_per_tile(32 * 32) == 256
    features = torch.randn(2, 1 + 32 * 32, 8)
    tokens = connector(features)
    assert tokens.shape == (2, 256, 16)
    assert connector.norm.normalized_shape == (8 * 4,)


def test_pixel_shuffle_mlp_drops_cls_token_and_shuffles_patches_row_major():
    _seed()
    connector = PixelShuffleMLP(vision_dim=3, text_dim=5).eval()
    features = torch.randn(1, 1 + 4 * 4, 3)
    expected_in = _naive_pixel_shuffle_2x2(features[:, 1:].reshape(1, 4, 4, 3)).reshape(1, 4, 12)
    expected = connector.fc2(F.gelu(connector.fc1(connector.norm(expected_in))))
    torch.testing.assert_close(connector(features), expected)
    # The cls token does not reach the output.
    changed = features.clone()
    changed[:, 0] += 100.0
    torch.testing.assert_close(connector(changed), connector(features), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# 2. Attention backends
# --------------------------------------------------------------------------------------------------


def _naive_attention(q, k, v, mask=None):
    """Softmax attention written out: explicit exp / sum, kv head h // group for query head h."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    kv_index = torch.arange(num_heads) // (num_heads // num_kv_heads)
    k, v = k[:, kv_index].double(), v[:, kv_index].double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
    scores = torch.where(allowed, scores, torch.full_like(scores, -1e300))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed
    denominator = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(denominator > 0, weights / denominator.clamp(min=1e-300), torch.zeros_like(weights))
    return torch.einsum("bhqk,bhkd->bhqd", weights, v).to(q.dtype)


def _qkv(batch=2, heads=4, kv_heads=4, tq=5, tk=5, dim=8, requires_grad=False):
    q = torch.randn(batch, heads, tq, dim, requires_grad=requires_grad)
    k = torch.randn(batch, kv_heads, tk, dim, requires_grad=requires_grad)
    v = torch.randn(batch, kv_heads, tk, dim, requires_grad=requires_grad)
    return q, k, v


def _block_diagonal_padding_mask():
    """(2, 1, 5, 5): sample 0 packs documents [0,0,1,1,1]; sample 1 has 3 real tokens + 2 pads."""
    documents = torch.tensor([0, 0, 1, 1, 1])
    block = documents[:, None] == documents[None, :]
    pad = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)[None, :].expand(5, 5)
    return torch.stack([block, pad])[:, None]


ATTENTION_CASES = {
    "no_mask": dict(shape={}, mask=None, is_causal=False),
    "causal": dict(shape={}, mask=None, is_causal=True),
    "padding_and_block_diagonal_mask": dict(shape={}, mask="block", is_causal=False),
    "mask_and_causal": dict(shape={}, mask="block", is_causal=True),
    "gqa_4_heads_share_2_kv_heads": dict(shape=dict(heads=4, kv_heads=2), mask=None, is_causal=False),
    "gqa_causal_with_mask": dict(shape=dict(heads=4, kv_heads=2), mask="block", is_causal=True),
    "kv_cache_causal_tq_lt_tk": dict(shape=dict(tq=3, tk=7), mask=None, is_causal=True),
    "kv_cache_gqa_causal": dict(shape=dict(heads=4, kv_heads=1, tq=2, tk=6), mask=None, is_causal=True),
}


def _case_inputs(case, requires_grad=False):
    q, k, v = _qkv(**case["shape"], requires_grad=requires_grad)
    mask = _block_diagonal_padding_mask() if case["mask"] == "block" else None
    return q, k, v, mask


def _reference_mask(case, q, k, mask):
    if not case["is_causal"]:
        return mask
    causal = causal_mask(q.shape[2], k.shape[2])
    return causal if mask is None else mask & causal


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_sdpa_backend_equals_eager_backend(name):
    case = ATTENTION_CASES[name]
    _seed()
    q, k, v, mask = _case_inputs(case)
    sdpa = attention(q, k, v, mask, is_causal=case["is_causal"], backend="sdpa")
    eager = attention(q, k, v, mask, is_causal=case["is_causal"], backend="eager")
    assert sdpa.shape == q.shape
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_eager_backend_equals_hand_written_softmax(name):
    case = ATTENTION_CASES[name]
    _seed()
    q, k, v, mask = _case_inputs(case)
    eager = attention(q, k, v, mask, is_causal=case["is_causal"], backend="eager")
    torch.testing.assert_close(eager, _naive_attention(q, k, v, _reference_mask(case, q, k, mask)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_sdpa_and_eager_gradients_agree(name):
    case = ATTENTION_CASES[name]
    _seed()
    q, k, v, mask = _case_inputs(case, requires_grad=True)
    upstream = torch.randn(q.shape)
    grads = {}
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, mask, is_causal=case["is_causal"], backend=backend)
        grads[backend] = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    for sdpa_grad, eager_grad in zip(grads["sdpa"], grads["eager"]):
        torch.testing.assert_close(sdpa_grad, eager_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_kv_cache_queries_see_the_same_keys_as_the_last_rows_of_full_causal_attention(backend):
    _seed()
    q, k, v = _qkv(heads=4, kv_heads=2, tq=7, tk=7)
    full = attention(q, k, v, is_causal=True, backend=backend)
    cached = attention(q[:, :, -3:], k, v, is_causal=True, backend=backend)
    torch.testing.assert_close(cached, full[:, :, -3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_fully_masked_query_row_outputs_exact_zeros_with_finite_gradients(backend):
    _seed()
    q, k, v = _qkv(batch=2, heads=4, kv_heads=2, tq=4, tk=5, requires_grad=True)
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of sample 0 may attend to nothing
    mask[1, :, :, 3:] = False
    out = attention(q, k, v, mask, backend=backend)
    assert torch.all(out[0, :, 2] == 0)
    assert torch.isfinite(out).all()
    # The other rows are ordinary attention.
    torch.testing.assert_close(out[1], _naive_attention(q, k, v, mask)[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out[0, :, [0, 1, 3]], _naive_attention(q, k, v, mask)[0, :, [0, 1, 3]], rtol=0, atol=1e-5
    )
    (out * torch.randn(out.shape)).sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    # The masked query receives no gradient: its output is a constant zero.
    assert torch.all(q.grad[0, :, 2] == 0)


def test_fully_padded_sample_outputs_zeros_under_key_padding_mask():
    _seed()
    q, k, v = _qkv(batch=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)[:, None, None, :]
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, mask, backend=backend)
        assert torch.all(out[1] == 0)
        assert torch.isfinite(out).all()


def test_attention_rejects_unknown_backend_and_indivisible_heads():
    q, k, v = _qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError):
        attention(q, k, v, backend="sdpa")
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        attention(q, k, v, backend="flash-please")


# --------------------------------------------------------------------------------------------------
# 3. InternViT parameter counts vs transformers' InternVLVisionModel
# --------------------------------------------------------------------------------------------------


def _hf_vision_config(config: InternViTConfig) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        norm_type=config.norm_type,
        layer_norm_eps=config.norm_eps,
        attention_bias=config.qkv_bias,
        use_qk_norm=config.qk_norm,
        layer_scale_init_value=config.layer_scale_init,
        use_mean_pooling=True,
        attn_implementation="eager",
    )


VISION_PRESETS_TO_COUNT = ["InternViT-300M-448px", "InternViT-6B-448px-V1-5", "InternViT-6B-224px"]


@pytest.mark.parametrize("preset", VISION_PRESETS_TO_COUNT)
def test_internvit_preset_has_as_many_parameters_as_transformers_internvl_vision(preset):
    config = InternViTConfig.from_name(preset)
    with torch.device("meta"):
        ours = InternViT(config)
        theirs = InternVLVisionModel(_hf_vision_config(config))
    assert _num_params(ours) == _num_params(theirs)
    # Tensor by tensor under the checkpoint-conversion mapping, not just the same total.
    mapped = _hf_vision_to_ours(theirs.state_dict(), config.num_layers)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_internvit_300m_preset_matches_published_parameter_count():
    with torch.device("meta"):
        model = InternViT("InternViT-300M-448px")
    assert _num_params(model) == 304_012_288


def test_internvit_6b_48_layer_preset_has_about_5_9_billion_parameters():
    with torch.device("meta"):
        model = InternViT("InternViT-6B-224px")
    assert model.config.num_layers == 48
    assert abs(_num_params(model) - 5.9e9) / 5.9e9 < 0.02


# --------------------------------------------------------------------------------------------------
# 4. InternViT numerical parity with transformers' InternVLVisionModel
# --------------------------------------------------------------------------------------------------

TINY_VISION_STYLES = {
    "300M_style": dict(norm_type="layer_norm", qkv_bias=True, qk_norm=False),
    "6B_style": dict(norm_type="rms_norm", qkv_bias=False, qk_norm=True),
}


def _tiny_vision_config(style: str, **overrides) -> InternViTConfig:
    base = dict(image_size=56, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)
    return InternViTConfig(**{**base, **TINY_VISION_STYLES[style], **overrides})


def _randomised_hf_vision_model(config: InternViTConfig) -> InternVLVisionModel:
    _seed(1)
    model = InternVLVisionModel(_hf_vision_config(config)).eval()
    with torch.no_grad():
        for param in model.parameters():  # transformers zero-initialises cls/pos; make every weight matter
            param.copy_(torch.randn_like(param) * 0.2)
    return model


def _hf_vision_to_ours(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {
        "embeddings.class_embedding": hf_state["embeddings.cls_token"],
        "embeddings.position_embedding": hf_state["embeddings.position_embeddings"],
        "embeddings.patch_embedding.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embedding.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
    }
    for n in range(num_layers):
        src, dst = f"encoder.layer.{n}.", f"layers.{n}."
        out[dst + "attn.qkv.weight"] = torch.cat([hf_state[src + f"attention.{p}_proj.weight"] for p in "qkv"])
        if src + "attention.q_proj.bias" in hf_state:
            out[dst + "attn.qkv.bias"] = torch.cat([hf_state[src + f"attention.{p}_proj.bias"] for p in "qkv"])
        renames = {
            "attention.projection_layer": "attn.proj",
            "attention.q_norm": "attn.q_norm",
            "attention.k_norm": "attn.k_norm",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
        }
        for key, value in hf_state.items():
            if not key.startswith(src):
                continue
            rest = key[len(src) :]
            for hf_name, our_name in renames.items():
                if rest.startswith(hf_name + "."):
                    out[dst + our_name + rest[len(hf_name) :]] = value
        out[dst + "ls1"] = hf_state[src + "lambda_1"]
        out[dst + "ls2"] = hf_state[src + "lambda_2"]
    return out


def _ours_loaded_from(hf_model: InternVLVisionModel, config: InternViTConfig) -> InternViT:
    ours = InternViT(config).eval()
    ours.load_state_dict(_hf_vision_to_ours(hf_model.state_dict(), config.num_layers), strict=True)
    return ours


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("style", list(TINY_VISION_STYLES))
def test_internvit_matches_transformers_internvl_vision_at_native_resolution(style, backend):
    config = _tiny_vision_config(style, attn_backend=backend)
    theirs = _randomised_hf_vision_model(config)
    ours = _ours_loaded_from(theirs, config)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(84, 84), (42, 70)], ids=["larger_square", "non_square"])
@pytest.mark.parametrize("style", list(TINY_VISION_STYLES))
def test_internvit_interpolates_position_embeddings_like_transformers_at_other_resolutions(style, size):
    config = _tiny_vision_config(style)
    theirs = _randomised_hf_vision_model(config)
    ours = _ours_loaded_from(theirs, config)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (2, 1 + (size[0] // 14) * (size[1] // 14), 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 5. select_layer
# --------------------------------------------------------------------------------------------------


def test_select_layer_minus_2_returns_output_after_all_but_the_last_block_and_skips_it():
    _seed()
    full = InternViT(_tiny_vision_config("300M_style")).eval()
    selected = InternViT(_tiny_vision_config("300M_style", select_layer=-2)).eval()
    selected.load_state_dict(full.state_dict())
    pixels = torch.randn(2, 3, 56, 56)

    calls = []
    selected.layers[-1].register_forward_pre_hook(lambda module, args: calls.append(module))
    with torch.no_grad():
        by_hand = full.embeddings(pixels)
        for block in full.layers[:-1]:
            by_hand = block(by_hand)
        got = selected(pixels)
        assert not torch.allclose(full(pixels), by_hand)  # the last block does change the output
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)
    assert calls == [], "the block after select_layer was run"
    assert selected.config.num_layers_run == full.config.num_layers - 1


@pytest.mark.parametrize("select_layer", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_select_layer_counts_like_transformers_hidden_states(select_layer):
    config = _tiny_vision_config("6B_style", select_layer=select_layer)
    theirs = _randomised_hf_vision_model(config)
    ours = _ours_loaded_from(theirs, config)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden_states = theirs(pixel_values=pixels, output_hidden_states=True).hidden_states
        got = ours(pixels)
    assert len(hidden_states) == config.num_layers + 1
    torch.testing.assert_close(got, hidden_states[select_layer], rtol=0, atol=1e-5)


def test_select_layer_outside_the_model_is_rejected():
    with pytest.raises(ValueError):
        _tiny_vision_config("300M_style", select_layer=-5)
    with pytest.raises(ValueError):
        _tiny_vision_config("300M_style", select_layer=4)


# --------------------------------------------------------------------------------------------------
# 6. Drop path and LayerScale
# --------------------------------------------------------------------------------------------------


def test_drop_path_rate_rises_linearly_from_zero_at_first_layer_to_rate_at_last():
    model = InternViT(_tiny_vision_config("300M_style", num_layers=5, drop_path_rate=0.2))
    rates = [layer.drop_path.p for layer in model.layers]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_published_300m_preset_drop_path_goes_from_0_at_layer_0_to_0_1_at_layer_23():
    with torch.device("meta"):
        model = InternViT("InternViT-300M-448px")
    rates = [layer.drop_path.p for layer in model.layers]
    assert len(rates) == 24 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


def test_drop_path_is_identity_in_eval_mode():
    _seed()
    x = torch.randn(8, 5, 4)
    assert torch.equal(DropPath(0.9).eval()(x), x)
    # A whole model with heavy drop path gives the same eval output as one without.
    plain = InternViT(_tiny_vision_config("300M_style")).eval()
    dropping = InternViT(_tiny_vision_config("300M_style", drop_path_rate=0.9)).eval()
    dropping.load_state_dict(plain.state_dict())
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(dropping(pixels), plain(pixels), rtol=0, atol=0)


def test_drop_path_in_training_drops_whole_samples_and_rescales_the_kept_ones():
    _seed()
    x = torch.randn(400, 3, 2) + 5.0
    out = DropPath(0.5).train()(x)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(dim=1)
    kept = ~dropped
    assert ((per_sample == 0).any(dim=1) == dropped).all(), "a sample was partly dropped"
    torch.testing.assert_close(out[kept], x[kept] / 0.5)
    assert 0.35 < dropped.float().mean().item() < 0.65


def test_layer_scale_parameters_start_at_layer_scale_init():
    model = InternViT(_tiny_vision_config("6B_style", layer_scale_init=0.37))
    for layer in model.layers:
        assert torch.equal(layer.ls1, torch.full((32,), 0.37))
        assert torch.equal(layer.ls2, torch.full((32,), 0.37))
        with torch.no_grad():
            layer.ls1.zero_()
        layer.reset_parameters()
        assert torch.equal(layer.ls1, torch.full((32,), 0.37))


# --------------------------------------------------------------------------------------------------
# 7. Language components
# --------------------------------------------------------------------------------------------------

TINY_LANGUAGE = dict(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, rope_theta=10_000.0
)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decoder_is_causal_changing_a_later_token_keeps_earlier_logits(backend):
    _seed()
    decoder = Decoder(LanguageConfig(**TINY_LANGUAGE, attn_backend=backend)).eval()
    ids = torch.randint(0, 50, (2, 8))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 50
    with torch.no_grad():
        before, after = decoder.head(decoder(ids)), decoder.head(decoder(changed))
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decoder_right_padding_leaves_real_token_outputs_unchanged(backend):
    _seed()
    decoder = Decoder(LanguageConfig(**TINY_LANGUAGE, attn_backend=backend)).eval()
    long_ids, short_ids = torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 5))
    batch = torch.cat([long_ids, torch.cat([short_ids, torch.full((1, 3), 7)], dim=1)])
    attention_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        padded = decoder(batch, attention_mask=attention_mask)
        alone_long, alone_short = decoder(long_ids), decoder(short_ids)
    torch.testing.assert_close(padded[0], alone_long[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[1, :5], alone_short[0], rtol=0, atol=1e-5)
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_text_encoder_pooling_ignores_padding(pooling):
    _seed()
    encoder = TextEncoder(LanguageConfig(**TINY_LANGUAGE), pooling=pooling).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([ids, torch.randint(0, 50, (1, 4))], dim=1)
    other_pads = torch.cat([ids, torch.randint(0, 50, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        alone = encoder(ids)
        with_pads = encoder(padded, attention_mask=mask)
        with_other_pads = encoder(other_pads, attention_mask=mask)
    assert alone.shape == (1, 32)
    torch.testing.assert_close(with_pads, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_other_pads, alone, rtol=0, atol=1e-5)


def test_text_encoder_mean_pooling_is_the_average_of_real_token_hidden_states():
    _seed()
    encoder = TextEncoder(LanguageConfig(**TINY_LANGUAGE), pooling="mean").eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        hidden = super(TextEncoder, encoder).forward(ids, attention_mask=mask)
        pooled = encoder(ids, attention_mask=mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :3].mean(0))


def test_text_encoder_is_bidirectional():
    _seed()
    encoder = TextEncoder(LanguageConfig(**TINY_LANGUAGE), pooling="last").eval()
    ids = torch.randint(0, 50, (1, 6))
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 50
    with torch.no_grad():
        hidden, hidden_changed = (super(TextEncoder, encoder).forward(x) for x in (ids, changed))
    assert not torch.allclose(hidden[0, 0], hidden_changed[0, 0])  # the first token sees the last


def test_grouped_query_attention_shapes():
    _seed()
    config = LanguageConfig(**{**TINY_LANGUAGE, "num_heads": 8, "num_kv_heads": 2})
    decoder = Decoder(config)
    attn = decoder.layers[0].self_attn
    head_dim = 32 // 8
    assert attn.q_proj.weight.shape == (8 * head_dim, 32)
    assert attn.k_proj.weight.shape == (2 * head_dim, 32)
    assert attn.v_proj.weight.shape == (2 * head_dim, 32)
    assert attn.o_proj.weight.shape == (32, 8 * head_dim)
    ids = torch.randint(0, 50, (3, 7))
    hidden = decoder(ids)
    assert hidden.shape == (3, 7, 32)
    assert decoder.head(hidden).shape == (3, 7, 50)
    with pytest.raises(ValueError):
        LanguageConfig(**{**TINY_LANGUAGE, "num_heads": 4, "num_kv_heads": 3})


def test_tied_decoder_head_uses_the_embedding_matrix():
    _seed()
    decoder = Decoder(LanguageConfig(**TINY_LANGUAGE, tie_embeddings=True))
    assert decoder.lm_head is None
    hidden = torch.randn(1, 2, 32)
    torch.testing.assert_close(decoder.head(hidden), hidden @ decoder.embed_tokens.weight.T)


def _qwen2_pair(backend: str):
    _seed(5)
    hf_config = Qwen2Config(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    theirs = Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():  # random norms and biases too, so that every copied tensor matters
        for param in theirs.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ours = Decoder(
        LanguageConfig(
            vocab_size=50,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=10_000.0,
            norm_eps=1e-6,
            qkv_bias=True,
            tie_embeddings=False,
            attn_backend=backend,
        )
    ).eval()
    state = {key.removeprefix("model."): value for key, value in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours, theirs


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decoder_logits_match_transformers_qwen2(backend):
    ours, theirs = _qwen2_pair(backend)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours.head(ours(ids))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_decoder_logits_match_transformers_qwen2_with_right_padding():
    ours, theirs = _qwen2_pair("sdpa")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(7))
    attention_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=attention_mask).logits
        got = ours.head(ours(ids, attention_mask=attention_mask))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, :6], expected[1, :6], rtol=0, atol=1e-4)


def test_decoder_and_text_encoder_build_on_the_meta_device():
    with torch.device("meta"):
        decoder = Decoder("InternVL3-1B")
        encoder = TextEncoder("tiny")
    assert all(p.is_meta for p in decoder.parameters()) and all(p.is_meta for p in encoder.parameters())
    # Qwen2.5-0.5B with InternVL's extra tokens, untied: 629,697,920 (see shared/reference/internvl3-1b.md).
    assert _num_params(decoder) == 629_697_920


def test_a_drop_path_rate_beside_a_preset_replaces_the_presets_rate_only():
    """A script layer's --drop_path_rate 0.0 beside the model layer's preset (recipes/scripts/)."""
    plain, scripted = InternViT("tiny"), InternViT("tiny", drop_path_rate=0.3)
    assert [layer.drop_path.p for layer in scripted.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert scripted.config == replace(plain.config, drop_path_rate=0.3)
