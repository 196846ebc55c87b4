"""The Qwen3 and Qwen3-MoE decoders (InternVL3.5's language models) against transformers' own classes with the same
weights: logits, the load-balancing loss of a forward pass, and the real sizes' parameter counts."""

from __future__ import annotations

import pytest
import torch

from lit_internvl.components import Decoder, LanguageConfig
from lit_internvl.components.language import LANGUAGE_PRESETS
from lit_internvl.components.moe import MoEConfig, SparseMoE

transformers = pytest.importorskip("transformers")
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

VOCAB = 97
# 5 query heads over 1 key/value head, head_dim 24 ≠ 80 / 5; of four layers sparse_step 2 makes 1 and 3 sparse, and
# mlp_only_layers keeps 3 dense.
DIMS = dict(hidden_size=80, num_layers=4, num_heads=5, num_kv_heads=1, head_dim=24, intermediate_size=56)


def _pair(moe: bool, backend: str = "sdpa", tie: bool = False):
    """Our decoder and transformers' with the same random weights (norms, router and experts included)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=80, intermediate_size=56, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e4},
        tie_word_embeddings=tie, attn_implementation="eager",
    )  # fmt: skip
    if moe:
        config = Qwen3MoeConfig(
            **common, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=20, norm_topk_prob=True,
            decoder_sparse_step=2, mlp_only_layers=[3], output_router_logits=True, router_aux_loss_coef=0.01,
        )  # fmt: skip
        theirs = Qwen3MoeForCausalLM(config)
    else:
        theirs = Qwen3ForCausalLM(Qwen3Config(**common))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3 if name.endswith("mlp.gate.weight") else 0.1)  # a router far from uniform
    moe_config = MoEConfig(6, 3, 20, sparse_step=2, mlp_only_layers=(3,), aux_loss_coef=0.01) if moe else None
    ours = Decoder(
        LanguageConfig(
            vocab_size=VOCAB, **DIMS, norm_eps=1e-5, rope_theta=5e4, qkv_bias=False, qk_norm=True, tie_embeddings=tie,
            attn_backend=backend, moe=moe_config,
        )
    )  # fmt: skip
    state = {key.removeprefix("model."): value for key, value in theirs.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=True)
    return ours.eval(), theirs.eval()


def _batch():
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize(
    "moe, backend, tie", [(False, "sdpa", False), (False, "eager", True), (True, "sdpa", False), (True, "eager", True)]
)
def test_decoder_logits_equal_transformers_qwen3(moe, backend, tie):
    ours, theirs = _pair(moe, backend, tie)
    ids, mask = _batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours.head(ours(ids, attention_mask=mask))
    real = mask.bool()
    diff = (expected[real] - got[real]).abs().max().item()
    print(f"\n[Qwen3{'-MoE' if moe else ''}, {backend}, tie={tie}] max |Δlogit| = {diff:.2e}")
    assert diff <= 1e-4
    kinds = [type(layer.mlp).__name__ for layer in ours.layers]
    assert kinds == (["SwiGLU", "SparseMoE", "SwiGLU", "SwiGLU"] if moe else ["SwiGLU"] * 4)


def test_a_missing_qk_norm_would_be_caught():
    ours, theirs = _pair(moe=False)
    ids, mask = _batch()
    for layer in ours.layers:
        layer.self_attn.q_norm = None  # the norms skipped
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - ours.head(ours(ids))).abs().max().item()
    assert diff > 1e-2


def test_aux_loss_equals_transformers_aux_loss_of_the_same_forward():
    ours, theirs = _pair(moe=True)
    ids, mask = _batch()
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, labels=ids)
        ours(ids, attention_mask=mask)
    torch.testing.assert_close(ours.aux_loss(), out.aux_loss, rtol=1e-5, atol=0)
    # transformers adds router_aux_loss_coef · aux to its loss; our stages add moe.aux_loss_coef · aux to theirs
    assert ours.config.moe.aux_loss_coef == theirs.config.router_aux_loss_coef
    assert ours.aux_loss(attention_mask=torch.ones_like(mask)) != ours.aux_loss(), "the mask counts"
    dense, _ = _pair(moe=False)
    assert dense.aux_loss() is None


def test_packed_rows_count_only_real_documents_in_the_aux_loss():
    ours, _ = _pair(moe=True)
    ids = torch.randint(0, VOCAB, (1, 10))
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1, -1]])  # two documents, then padding
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]], dtype=torch.float32)
    with torch.no_grad():
        ours(ids, positions=positions, document_ids=documents, attention_mask=None)
    layer = next(m for m in ours.modules() if isinstance(m, SparseMoE))
    from lit_internvl.components.moe import load_balancing_loss

    expected = load_balancing_loss([layer.router_logits[:7]], 6, 3)
    torch.testing.assert_close(ours.aux_loss(), expected)


# -- sizes ---------------------------------------------------------------------------------------------------------

QWEN3_SIZES = [name for name, config in LANGUAGE_PRESETS.items() if config.qk_norm and not name.startswith("tiny")]


@pytest.mark.parametrize("name", QWEN3_SIZES)
def test_real_size_decoders_count_as_many_parameters_as_transformers(name):
    config = LANGUAGE_PRESETS[name]
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, tie_word_embeddings=config.tie_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        ours = Decoder(name)
        if config.moe is None:
            theirs = Qwen3ForCausalLM(Qwen3Config(**fields))
        else:
            moe = config.moe
            theirs = Qwen3MoeForCausalLM(
                Qwen3MoeConfig(
                    **fields, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                    moe_intermediate_size=moe.intermediate_size,
                )
            )  # fmt: skip
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(f"\n[{name}] {count(ours):,} parameters")
    assert count(ours) == count(theirs)


def test_tiny_presets_are_qwen3_shaped():
    qwen3, moe = LANGUAGE_PRESETS["tiny-qwen3"], LANGUAGE_PRESETS["tiny-moe"]
    assert qwen3.vocab_size == moe.vocab_size == LANGUAGE_PRESETS["tiny-shapes"].vocab_size == 394
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim != qwen3.hidden_size // qwen3.num_heads
    assert moe.moe.num_experts == 8 and moe.moe.top_k == 2
    assert Decoder("tiny-moe").aux_loss is not None
    assert LanguageConfig.from_name("tiny-moe").moe is not LANGUAGE_PRESETS["tiny-moe"].moe


def test_a_text_only_qwen3_moe_folder_loads_with_its_experts_stacked(tmp_path):
    """NMP's ``init_from: hf:/Qwen3-30B-A3B`` path: the per-expert matrices save_pretrained writes become ours."""
    from lit_internvl.hf.parts import part_of, read_part_state_dict

    ours, theirs = _pair(moe=True)
    theirs.save_pretrained(str(tmp_path))
    assert part_of(tmp_path) == "text"
    state = read_part_state_dict(tmp_path)
    fresh = Decoder(ours.config).eval()
    fresh.load_state_dict({k.removeprefix("decoder."): v for k, v in state.items()}, strict=True)
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.head(fresh(ids)), theirs(input_ids=ids).logits, rtol=0, atol=1e-4)
