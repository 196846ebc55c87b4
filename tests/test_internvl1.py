"""InternVL 1 as released: InternVL-C and InternVL-G load from OpenGVLab's layout (``InternVL-14B-224px``: vision_model,
qllama, clip_projector, clip_projector2, text_projection, itm_head) by name, with no remote code, and embed
exactly as the reference's modules compute (written out here: OpenGVLab/InternVL
``clip_benchmark/clip_benchmark/models/internvl_huggingface/modeling_internvl.py`` and ``modeling_qllama.py``;
the text side by transformers' own ``LlamaModel``). The attention pool, the last-token text embedding and
the resized position table, each against the reference formula."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel

from lit_internvl.components import InternViT, TextEncoder
from lit_internvl.components.language import LanguageConfig, Transformer, pool_text
from lit_internvl.components.vision import InternViTConfig, resize_position_table
from lit_internvl.hf.internvl1 import load_internvl1
from lit_internvl.models.dual_encoder import AttentionPool, DualEncoder
from lit_internvl.models.qllama import InternVLG, QLLaMA
from lit_internvl.stages import ContrastiveStage, GenerativeStage
from lit_internvl.stages.generative import reference_itm_labels

V, VL, P, IMG = 32, 2, 14, 28  # vision width, layers, patch, native image size (a 2 × 2 grid)
D, L, H, VOCAB, Q, E, POOL_HEADS = 32, 2, 4, 64, 3, 16, 4  # QLLaMA width, layers, heads; queries; embed dim


# --------------------------------------------------------------------------------------------------
# The reference computation, written out
# --------------------------------------------------------------------------------------------------


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def attention_pool(x, s, prefix, heads=POOL_HEADS):
    """AttentionPoolingBlock: x_q = mean(x); norm1_q/k/v (LayerNorm, eps 1e-5); CrossAttention with q/k/v
    weights and separate q_bias/k_bias/v_bias; softmax(q·kᵀ · head_dim^-½)·v; proj."""
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], s[f"{prefix}.{n}.weight"], s[f"{prefix}.{n}.bias"], 1e-5)  # noqa: E731
    a = f"{prefix}.cross_attn"
    q = F.linear(ln(x.mean(1, keepdim=True), "norm1_q"), s[f"{a}.q.weight"], s[f"{a}.q_bias"])
    k = F.linear(ln(x, "norm1_k"), s[f"{a}.k.weight"], s[f"{a}.k_bias"])
    v = F.linear(ln(x, "norm1_v"), s[f"{a}.v.weight"], s[f"{a}.v_bias"])
    b, n, c = k.shape
    split = lambda t: t.reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = (q * (c // heads) ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, 1, c)
    return F.linear(out, s[f"{a}.proj.weight"], s[f"{a}.proj.bias"]).squeeze(1)


def vision_reference(pixels, s):
    """InternViT-6B style (RMSNorm, qk-norm over the full width, no qkv bias, layer scale), last layer out."""
    e = "vision_model.embeddings"
    x = F.conv2d(pixels, s[f"{e}.patch_embedding.weight"], s[f"{e}.patch_embedding.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((s[f"{e}.class_embedding"].expand(len(x), -1, -1), x), 1) + s[f"{e}.position_embedding"]
    for i in range(VL):
        p = f"vision_model.encoder.layers.{i}"
        h = rms(x, s[f"{p}.norm1.weight"])
        q, k, v = F.linear(h, s[f"{p}.attn.qkv.weight"]).chunk(3, -1)
        q, k = rms(q, s[f"{p}.attn.q_norm.weight"]), rms(k, s[f"{p}.attn.k_norm.weight"])
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, 4, V // 4).transpose(1, 2) for t in (q, k, v))
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(V // 4)).softmax(-1) @ v
        x = x + s[f"{p}.ls1"] * F.linear(
            a.transpose(1, 2).reshape(b, n, V), s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"]
        )
        h = rms(x, s[f"{p}.norm2.weight"])
        mlp = F.linear(F.gelu(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"])), s[f"{p}.mlp.fc2.weight"])
        x = x + s[f"{p}.ls2"] * (mlp + s[f"{p}.mlp.fc2.bias"])
    return x


def rope(x, positions, base=10_000.0):
    dim = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(positions.float(), inv)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)
    return x * cos + half * sin


def qllama_queries_reference(vision, s):
    """QLLaMA's image-only pass (``get_image_features``): the query tokens through LLaMA blocks, cross-attention
    to the vision features after self-attention in every second block (norm1 on the queries, norm2 on the
    vision features, no RoPE, no mask), then the final norm."""
    m = "qllama.model"
    x = s["query_tokens"].expand(len(vision), -1, -1)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
    for i in range(L):
        p = f"{m}.layers.{i}"
        h = rms(x, s[f"{p}.input_layernorm.weight"])
        q, k, v = (heads(F.linear(h, s[f"{p}.self_attn.{n}_proj.weight"])) for n in "qkv")
        positions = torch.arange(Q)
        q, k = rope(q, positions), rope(k, positions)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(D // H)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(x.shape), s[f"{p}.self_attn.o_proj.weight"])
        if i % 2 == 0:
            c = f"{p}.cross_attn"
            qc = heads(F.linear(rms(x, s[f"{c}.norm1.weight"]), s[f"{c}.q_proj.weight"]))
            vn = rms(vision, s[f"{c}.norm2.weight"])
            kc, vc = heads(F.linear(vn, s[f"{c}.k_proj.weight"])), heads(F.linear(vn, s[f"{c}.v_proj.weight"]))
            a = ((qc @ kc.transpose(-2, -1)) / math.sqrt(D // H)).softmax(-1) @ vc
            x = x + F.linear(a.transpose(1, 2).reshape(x.shape), s[f"{c}.o_proj.weight"])
        h = rms(x, s[f"{p}.post_attention_layernorm.weight"])
        gate, up = F.linear(h, s[f"{p}.mlp.gate_proj.weight"]), F.linear(h, s[f"{p}.mlp.up_proj.weight"])
        x = x + F.linear(F.silu(gate) * up, s[f"{p}.mlp.down_proj.weight"])
    return rms(x, s[f"{m}.norm.weight"])


def text_reference(ids, mask, s):
    """``get_text_features`` → the last real token → ``@ text_projection``; the causal LLaMA is transformers'."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H, rms_norm_eps=1e-6,
    )  # fmt: skip
    llama = LlamaModel(config).eval()
    text_state = {
        k[len("qllama.model.") :]: v for k, v in s.items() if k.startswith("qllama.model.") and "cross_attn" not in k
    }
    llama.load_state_dict(text_state)
    hidden = llama(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(ids)), mask.sum(1) - 1] @ s["text_projection"]


# --------------------------------------------------------------------------------------------------
# A tiny released checkpoint, written in OpenGVLab's layout
# --------------------------------------------------------------------------------------------------


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    s = {
        "vision_model.embeddings.class_embedding": r(1, 1, V),
        "vision_model.embeddings.patch_embedding.weight": r(V, 3, P, P) * 0.1,
        "vision_model.embeddings.patch_embedding.bias": r(V),
        "vision_model.embeddings.position_embedding": r(1, (IMG // P) ** 2 + 1, V),
        "query_tokens": r(1, Q, D),
        "text_projection": r(D, E),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "itm_head.weight": r(2, D),
        "itm_head.bias": r(2),
        "qllama.model.embed_tokens.weight": r(VOCAB, D),
        "qllama.model.norm.weight": 1 + r(D),
        "qllama.lm_head.weight": r(VOCAB, D),
    }
    for i in range(VL):
        p = f"vision_model.encoder.layers.{i}"
        s |= {
            f"{p}.norm1.weight": 1 + r(V), f"{p}.norm2.weight": 1 + r(V), f"{p}.ls1": r(V), f"{p}.ls2": r(V),
            f"{p}.attn.qkv.weight": r(3 * V, V), f"{p}.attn.q_norm.weight": 1 + r(V), f"{p}.attn.k_norm.weight": 1 + r(V),
            f"{p}.attn.proj.weight": r(V, V), f"{p}.attn.proj.bias": r(V),
            f"{p}.mlp.fc1.weight": r(2 * V, V), f"{p}.mlp.fc1.bias": r(2 * V),
            f"{p}.mlp.fc2.weight": r(V, 2 * V), f"{p}.mlp.fc2.bias": r(V),
        }  # fmt: skip
    for i in range(L):
        p = f"qllama.model.layers.{i}"
        s |= {f"{p}.self_attn.{n}_proj.weight": r(D, D) for n in "qkvo"}
        s |= {f"{p}.mlp.gate_proj.weight": r(2 * D, D), f"{p}.mlp.up_proj.weight": r(2 * D, D),
              f"{p}.mlp.down_proj.weight": r(D, 2 * D)}  # fmt: skip
        s |= {f"{p}.input_layernorm.weight": 1 + r(D), f"{p}.post_attention_layernorm.weight": 1 + r(D)}
        if i % 2 == 0:
            c = f"{p}.cross_attn"
            s |= {f"{c}.q_proj.weight": r(D, D), f"{c}.k_proj.weight": r(D, V), f"{c}.v_proj.weight": r(D, V),
                  f"{c}.o_proj.weight": r(D, D), f"{c}.norm1.weight": 1 + r(D), f"{c}.norm2.weight": 1 + r(V)}  # fmt: skip
    for name, width in (("clip_projector", V), ("clip_projector2", D)):
        s |= {
            f"{name}.norm1_{n}.{w}": (1 + r(width)) if w == "weight" else r(width)
            for n in "qkv"
            for w in ("weight", "bias")
        }
        s |= {f"{name}.cross_attn.{n}.weight": r(width, width) for n in "qkv"}
        s |= {f"{name}.cross_attn.{n}_bias": r(width) for n in "qkv"}
        s |= {f"{name}.cross_attn.proj.weight": r(E, width), f"{name}.cross_attn.proj.bias": r(E)}
    return s


def write_released(folder, state, force_image_size=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["InternVLModel"], "model_type": "internvl",
        "auto_map": {"AutoModel": "modeling_internvl.InternVLModel"},  # remote code: never run
        "vision_config": {"hidden_size": V, "num_hidden_layers": VL, "num_attention_heads": 4, "intermediate_size": 2 * V,
                          "image_size": IMG, "patch_size": P, "qkv_bias": False, "qk_normalization": True,
                          "norm_type": "rms_norm", "layer_norm_eps": 1e-6},
        "qllama_config": {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": D,
                          "intermediate_size": 2 * D, "num_hidden_layers": L, "num_attention_heads": H,
                          "rms_norm_eps": 1e-6, "hidden_act": "silu"},
        "clip_embed_dim": E, "attn_pool_num_heads": POOL_HEADS, "num_query_token": Q, "cross_attention_frequency": 2,
        "force_image_size": force_image_size, "use_backbone_lora": 0, "use_qllama_lora": 0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def _inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, IMG, IMG, generator=g)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    return pixels, ids, mask


def test_internvl_g_loads_from_the_released_layout_and_embeds_as_the_reference(tmp_path):
    state = released_state()
    model = load_internvl1(write_released(tmp_path / "g", state), "g")  # every tensor used, none missing
    assert isinstance(model, InternVLG)
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        features = vision_reference(pixels, state)
        backbone = F.normalize(attention_pool(features, state, "clip_projector"), dim=-1)
        queries = F.normalize(
            attention_pool(qllama_queries_reference(features, state), state, "clip_projector2"), dim=-1
        )
        expected_image = F.normalize(backbone + queries, dim=-1)  # InternVL_G.encode_image, then normalised
        expected_text = F.normalize(text_reference(ids, mask, state), dim=-1)
        stage1, internvl_g = model.encode_image(pixels)
        torch.testing.assert_close(model.vision(pixels), features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stage1, backbone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(internvl_g, expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), expected_text, rtol=1e-5, atol=1e-5)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_internvl_c_loads_the_parts_it_has_and_embeds_as_the_reference(tmp_path, caplog):
    state = released_state(seed=2)
    with caplog.at_level("INFO"):
        model = load_internvl1(write_released(tmp_path / "c", state), "c")
    assert isinstance(model, DualEncoder) and "InternVL-C does not use" in caplog.text
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        expected_image = F.normalize(attention_pool(vision_reference(pixels, state), state, "clip_projector"), dim=-1)
        expected_text = F.normalize(text_reference(ids, mask, state), dim=-1)
        torch.testing.assert_close(model.encode_image(pixels), expected_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), expected_text, rtol=1e-5, atol=1e-5)


def test_force_image_size_resizes_the_position_table_once_at_load(tmp_path):
    state = released_state()
    model = load_internvl1(write_released(tmp_path / "g", state, force_image_size=42), "g")
    table = model.vision.embeddings.position_embedding
    assert table.shape == (1, 3 * 3 + 1, V) and model.vision.config.image_size == 42
    expected = resize_position_table(state["vision_model.embeddings.position_embedding"], 3, 3)
    torch.testing.assert_close(table.detach(), expected)


def test_released_folder_is_an_init_from_of_both_stages(tmp_path):
    folder = write_released(tmp_path / "g", released_state())
    g = GenerativeStage(load_internvl1(folder, "g").vision, lambda d: QLLaMA(d, _language(), num_queries=Q),
                        embed_dim=E, attn_pool_heads=POOL_HEADS, init_from=f"hf:{folder}")  # fmt: skip
    g.configure_model()
    reference = load_internvl1(folder, "g")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(g.model.state_dict()[name], tensor, msg=name)
    c = ContrastiveStage(
        InternViT(_vision()), TextEncoder(_language(), pooling="last", causal=True), embed_dim=E,
        attn_pool_heads=POOL_HEADS, init_from=f"hf:{folder}",
    )  # fmt: skip
    c.configure_model()
    reference = load_internvl1(folder, "c")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(c.model.state_dict()[name], tensor, msg=name)


def _vision() -> InternViTConfig:
    return InternViTConfig(image_size=IMG, patch_size=P, hidden_size=V, num_layers=VL, num_heads=4,
                           intermediate_size=2 * V, norm_type="rms_norm", qkv_bias=False, qk_norm=True)  # fmt: skip


def _language() -> LanguageConfig:
    return LanguageConfig(vocab_size=VOCAB, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=H,
                          intermediate_size=2 * D, norm_eps=1e-6, rope_theta=10_000.0, tie_embeddings=False)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Each formula, alone
# --------------------------------------------------------------------------------------------------


def test_attention_pool_is_the_reference_attention_pooling_block():
    torch.manual_seed(0)
    pool = AttentionPool(12, 5, num_heads=3)
    for param in pool.parameters():  # biases and LayerNorms away from their initial values
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 7, 12)
    state = {f"p.{k}": v for k, v in pool.state_dict().items()}
    torch.testing.assert_close(pool(x), attention_pool(x, state, "p", heads=3), rtol=1e-6, atol=1e-6)
    assert {"norm1_q.weight", "cross_attn.q_bias", "cross_attn.k_bias", "cross_attn.proj.bias"} <= set(
        pool.state_dict()
    )
    assert pool.norm1_k.eps == 1e-5


def test_last_token_text_embedding_is_the_last_real_tokens_state():
    torch.manual_seed(0)
    hidden, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[0, 4], hidden[1, 1], hidden[2, 0]])
    assert torch.equal(pool_text(hidden, mask, "last"), expected)


def test_causal_text_tower_reads_no_later_token():
    """InternVL-C's text tower is causal: a token's state does not change when a later token does."""
    torch.manual_seed(0)
    tower = TextEncoder(_language(), pooling="last", causal=True).eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB
    with torch.no_grad():
        hidden, hidden_changed = Transformer.forward(tower, ids), Transformer.forward(tower, changed)
        bidirectional = TextEncoder(_language(), pooling="last").eval()
        bidirectional.load_state_dict(tower.state_dict())
        other, other_changed = Transformer.forward(bidirectional, ids), Transformer.forward(bidirectional, changed)
    assert torch.allclose(hidden[:, :5], hidden_changed[:, :5], atol=1e-6)
    assert not torch.allclose(hidden[:, 5], hidden_changed[:, 5])
    assert not torch.allclose(other[:, :5], other_changed[:, :5])  # the test can fail: the bidirectional one does


def test_query_tokens_start_at_zero():
    assert torch.count_nonzero(QLLaMA(8, _language(), num_queries=Q).query_tokens) == 0


@pytest.mark.parametrize(("batch", "negatives"), [(1, 1), (2, 1), (5, 3), (8, 4)])
def test_itm_layout_is_the_references(batch, negatives):
    """First B − ⌊B/2⌋ rows pair an image with another image's caption (label 0), the last ⌊B/2⌋ with its own."""
    labels = reference_itm_labels(batch)
    assert labels.tolist() == [0] * negatives + [1] * (batch - negatives)


def test_resize_position_table_is_bicubic_on_the_grid_and_keeps_the_cls_entry():
    table = torch.randn(1, 1 + 4 * 4, 6)
    grid = table[:, 1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 6)
    )
    resized = resize_position_table(table, 6, 6)
    assert torch.equal(resized[:, :1], table[:, :1])
    torch.testing.assert_close(resized[:, 1:], expected)
