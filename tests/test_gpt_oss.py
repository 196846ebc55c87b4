"""The GPT-OSS decoder (InternVL3.5-20B-A4B's language model) against transformers' ``GptOssForCausalLM`` with the
same weights: logits with padding and sequences longer than the sliding window, on every backend that honours
sinks and windows; the load-balancing loss of a forward; incremental decoding; and the real size's parameter count.

The weights are moved into lit_internvl's layout here, by transformers' layout as ``GptOssMLP`` holds it (router
``mlp.router``, experts transposed), not with lit_internvl.hf's tables."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from lit_internvl.components import Decoder, LanguageConfig
from lit_internvl.components.attention import set_attention_backend
from lit_internvl.components.language import KVCache
from lit_internvl.components.moe import MoEConfig
from lit_internvl.components.rotary import RopeScaling

VOCAB, WINDOW, LENGTH = 97, 4, 13
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")
YARN = dict(factor=8.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, truncate=False)


def transformers_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """5 query heads over 1 key/value head, head_dim 12 ≠ 40 / 5, 6 experts (top 3) of width 12, a clamp of 2.5 that
    bites, windows of 4 on layers 0 and 2; every weight random (norms around 1, sinks and router wide)."""
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=12, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=1, head_dim=12, num_local_experts=6, num_experts_per_tok=3, swiglu_limit=2.5,
        sliding_window=WINDOW, layer_types=list(LAYER_TYPES), rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150_000.0, **YARN}, max_position_embeddings=128,
        router_aux_loss_coef=0.9, output_router_logits=True, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(("sinks", "router.weight", "router.bias")):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def gpt_oss_language_config(**changes) -> LanguageConfig:
    fields = dict(
        vocab_size=VOCAB, hidden_size=40, num_layers=3, num_heads=5, num_kv_heads=1, head_dim=12, intermediate_size=12,
        norm_eps=1e-5, rope_theta=150_000.0, qkv_bias=True, o_bias=True, attention_sinks=True, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, rope_scaling=RopeScaling(**YARN),
        moe=MoEConfig(6, 3, 12, style="gpt_oss", swiglu_limit=2.5, aux_loss_coef=0.9),
    )  # fmt: skip
    return LanguageConfig(**{**fields, **changes})


def ours_from_transformers(theirs: GptOssForCausalLM, backend: str = "eager") -> Decoder:
    state = {}
    for name, tensor in theirs.state_dict().items():
        name = name.removeprefix("model.").replace(".mlp.router.", ".mlp.gate.")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2)  # (E, H, 2I) → (E, 2I, H); (E, I, H) → (E, H, I)
        state[name] = tensor
    ours = Decoder(gpt_oss_language_config(attn_backend=backend))
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def _batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=generator)
    padding = torch.ones(2, LENGTH, dtype=torch.long)
    padding[1, 9:] = 0  # right padding
    return ids, padding


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_decoder_logits_equal_transformers_gpt_oss(backend):
    theirs = transformers_gpt_oss()
    ours = ours_from_transformers(theirs, backend)
    ids, padding = _batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on the CPU warns that it runs unfused
        expected = theirs(ids, attention_mask=padding).logits
        got = ours.head(ours(ids, attention_mask=padding))
    real = padding.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    print(f"\n[GPT-OSS decoder, {backend}] max |Δlogit| = {diff:.2e} (scale {expected.abs().max().item():.1f})")
    assert diff <= 1e-4


def test_a_missing_sink_or_window_would_be_caught():
    """The comparison can fail: without the sinks, or with every layer full, the logits move far past 1e-4."""
    theirs = transformers_gpt_oss()
    ids, padding = _batch()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=padding).logits
        ours = ours_from_transformers(theirs)
        for layer in ours.layers:
            layer.self_attn.sinks.fill_(-1e4)
        no_sinks = (ours.head(ours(ids, attention_mask=padding)) - expected).abs().max().item()
        ours = ours_from_transformers(theirs)
        for layer in ours.layers:
            layer.self_attn.window = None
        no_window = (ours.head(ours(ids, attention_mask=padding)) - expected).abs().max().item()
    assert no_sinks > 1e-2 and no_window > 1e-2, (no_sinks, no_window)


def test_aux_loss_equals_transformers_aux_loss_of_the_same_forward():
    theirs = transformers_gpt_oss()
    ours = ours_from_transformers(theirs)
    ids, padding = _batch()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=padding).aux_loss
        ours(ids, attention_mask=padding)
    torch.testing.assert_close(ours.aux_loss(), expected, atol=1e-6, rtol=0)
    assert ours.config.moe.aux_loss_coef == theirs.config.router_aux_loss_coef


def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate():
    """Eight tokens past a 6-token prompt, one at a time through the cache (past the window of 4)."""
    theirs = transformers_gpt_oss()
    ours = ours_from_transformers(theirs, "sdpa")
    prompt = _batch()[0][:1, :6]
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
        cache, ids = KVCache(len(ours.layers)), prompt
        step = prompt
        for _ in range(8):
            step = ours.head(ours(step, cache=cache))[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    assert torch.equal(ids, expected)


def test_backends_without_sinks_are_refused_for_the_real_size():
    with torch.device("meta"):
        decoder = Decoder("InternVL3.5-20B-A4B")
        with pytest.raises(ValueError, match="'varlen' with learned attention sinks and a sliding window"):
            set_attention_backend(decoder, "varlen")
        with pytest.raises(ValueError, match="'xformers' with learned attention sinks"):
            Decoder(LanguageConfig.from_name("tiny-gpt-oss", attn_backend="xformers"))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["InternVL3.5-20B-A4B", "tiny-gpt-oss"])
def test_presets_count_as_many_parameters_as_transformers_gpt_oss(preset):
    """GPT-OSS-20B as released (openai/gpt-oss-20b config.json): 20,914,757,184 parameters, its model card's 20.9B."""
    config = LanguageConfig.from_name(preset)
    moe = config.moe
    theirs_config = GptOssConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=moe.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k, sliding_window=config.sliding_window, layer_types=list(config.layer_types),
        tie_word_embeddings=config.tie_embeddings,
    )  # fmt: skip
    with torch.device("meta"):
        ours, theirs = Decoder(config), GptOssForCausalLM(theirs_config)
    assert _count(ours) == _count(theirs)
    if preset == "InternVL3.5-20B-A4B":
        assert _count(ours) == 20_914_757_184


# -- training the tiny twin ----------------------------------------------------------------------------------------


def test_sft_on_tiny_gpt_oss_trains_every_gpt_oss_parameter_and_logs_the_aux_loss(tmp_path):
    """Two SFT steps on the default backend (sdpa): the sinks, the router's bias and the experts' biases all move."""
    import lightning as L

    from lit_internvl.components import InternViT, PixelShuffleMLP
    from lit_internvl.data import ShapesDataModule
    from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
    from lit_internvl.stages import SFTStage

    torch.manual_seed(0)
    decoder = Decoder("tiny-gpt-oss")
    stage = SFTStage(
        vision=InternViT("tiny"), connector=PixelShuffleMLP(128, 128), decoder=decoder,
        image_context_id=ByteTokenizer().token_to_id(IMG_CONTEXT), warmup_steps=1,
    )  # fmt: skip
    watched = ("self_attn.sinks", "mlp.gate.bias", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias")
    before = {n: p.detach().clone() for n, p in decoder.named_parameters() if n.endswith(watched)}
    data = ShapesDataModule(records="questions", train_size=8, val_size=4, batch_size=4, system="Answer in one word.")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(stage, data)
    after = dict(decoder.named_parameters())
    assert len(before) == 2 * 4 and all(not torch.equal(before[n], after[n]) for n in before)
    assert trainer.callback_metrics["train/aux_loss"] > 0.9


def test_lora_adapts_the_gpt_oss_experts_and_merges_exactly():
    from lit_internvl.lora import add_lora, lora_disabled, merge_lora
    from tests.tiny import tiny_vlm

    model = tiny_vlm(261, decoder="tiny-gpt-oss").eval()
    model.requires_grad_(False)
    add_lora(model, ["decoder"], r=4)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(0, 250, (2, 40))  # longer than the window (32)
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            base = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert (adapted - base).abs().max() > 1e-3 and (adapted - merged).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(tiny_vlm(261, decoder="tiny-gpt-oss").state_dict())


def test_flop_count_of_tiny_gpt_oss_equals_flop_counter_mode():
    """The analytic count (top-k experts, router; attention as the dense kernels' full square) equals torch's count of
    the eager backend and the loop over experts; biases and sinks add no matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    from lit_internvl.flops import transformer_flops

    config = LanguageConfig.from_name("tiny-gpt-oss", attn_backend="eager")
    config.moe.experts_backend = "loop"
    torch.manual_seed(0)
    model = Decoder(config)
    ids = torch.randint(0, 300, (2, 37))
    with FlopCounterMode(display=False) as counter:
        model.head(model(ids))
    assert counter.get_total_flops() == transformer_flops(config, [37, 37]).forward
