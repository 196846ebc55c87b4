"""InternVL3.5-20B-A4B's checkpoints: a tiny random transformers InternVL whose language model is GPT-OSS (5 query
heads over 1 key/value head, head_dim 12 ≠ 64 / 5, 6 experts of which 3 a token, windows of 4 on alternate layers
of a 24-token sequence, YaRN, a SwiGLU clamp that bites) loads from transformers' layout and from OpenGVLab's
(``InternVLChatModel`` around ``GptOssForCausalLM``, MXFP4 experts too) with transformers' logits and greedy tokens,
and exports back to transformers with the same logits.

The OpenGVLab layout is written here from the transformers model by the names OpenGVLab's code gives it
(``internvl_chat_gpt_oss/internvl/model/internvl_chat``: ``vision_model``, ``mlp1``, ``language_model`` = transformers'
``GptOssForCausalLM``, whose state dict is ``model.*`` and ``lm_head``), not with lit_internvl.hf's tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GptOssConfig, InternVLConfig, InternVLForConditionalGeneration
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lit_internvl.hf import export_vlm, load_vlm, read_config, read_vlm_state_dict
from lit_internvl.hf.names import dequantize_mxfp4
from tests.test_hf import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    TOKENS_PER_TILE,
    TOLERANCE,
    VISION_TO_OPENGVLAB,
    _assert_same_as_transformers,
    _inputs,
    _max_diff,
    _randomise,
    _replace_all,
    _tokenizer_folder,
    _vision_config,
)

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
YARN = {"factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}


def _text_config() -> GptOssConfig:
    return GptOssConfig(
        vocab_size=160, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=1, head_dim=12, num_local_experts=6, num_experts_per_tok=3, swiglu_limit=1.0,
        sliding_window=4, layer_types=LAYER_TYPES, rms_norm_eps=1e-5, router_aux_loss_coef=0.9,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150_000.0, **YARN}, max_position_embeddings=128,
    )  # fmt: skip


def _transformers_model(seed: int = 0) -> InternVLForConditionalGeneration:
    config = InternVLConfig(
        vision_config=_vision_config("300m"), text_config=_text_config(), image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    _randomise(model)
    with torch.no_grad():  # sinks and routers wide enough to matter
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "router.weight", "router.bias")):
                param.mul_(10.0)
    return model.eval()


def test_transformers_checkpoint_gives_the_same_logits_and_greedy_tokens(tmp_path):
    reference = _transformers_model()
    reference.save_pretrained(str(tmp_path / "saved"))
    spec = read_config(tmp_path / "saved")
    language = spec.language
    assert spec.text_architecture == "gpt_oss" and language.attention_sinks and language.o_bias and language.qkv_bias
    assert (language.sliding_window, language.layer_types) == (4, tuple(LAYER_TYPES))
    assert (language.head_dim, language.num_heads, language.num_kv_heads) == (12, 5, 1)
    assert language.rope_scaling.factor == 8.0 and language.rope_scaling.truncate is False
    moe = language.moe
    assert (moe.style, moe.num_experts, moe.top_k, moe.intermediate_size) == ("gpt_oss", 6, 3, 32)
    assert (moe.swiglu_limit, moe.swiglu_alpha, moe.aux_loss_coef) == (1.0, 1.702, 0.9)
    ours = load_vlm(tmp_path / "saved")
    _assert_same_as_transformers(reference, ours, "transformers layout, GPT-OSS + 300m")

    # The in-memory names (model.language_model.*, lm_head) map to the same tensors.
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, str(tmp_path / "memory" / "model.safetensors"))
    saved, memory = read_vlm_state_dict(tmp_path / "saved"), read_vlm_state_dict(tmp_path / "memory")
    assert saved.keys() == memory.keys() and all(torch.equal(saved[k], memory[k]) for k in saved)


def test_a_wrong_expert_layout_would_be_caught(tmp_path):
    """Reading the experts without transposing them back to gate/up interleaved rows moves the logits far off."""
    reference = _transformers_model()
    reference.save_pretrained(str(tmp_path))
    ours = load_vlm(tmp_path)
    with torch.no_grad():
        experts = ours.decoder.layers[1].mlp.experts
        gate_up = experts.gate_up_proj.clone()
        experts.gate_up_proj.copy_(torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1))  # [gate; up] halves
    diff = _max_diff(reference, ours, *_inputs())
    print(f"\n[gate/up read as halves] max |Δlogit| = {diff:.2e}")
    assert diff > 100 * TOLERANCE


def _mxfp4(tensor_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 ``blocks (E, R, C/32, 16)`` and ``scales (E, R, C/32)`` of an ``(E, R, C)`` matrix stack."""
    generator = torch.Generator().manual_seed(seed)
    experts, rows, columns = tensor_shape
    blocks = torch.randint(0, 256, (experts, rows, columns // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(122, 128, (experts, rows, columns // 32), generator=generator, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_dequantisation_equals_transformers():
    blocks, scales = _mxfp4((3, 8, 64), seed=0)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # (E, C, R): transposed
    assert torch.equal(dequantize_mxfp4(blocks, scales), expected.transpose(1, 2))
    one = torch.zeros(1, 1, 16, dtype=torch.uint8)
    one[0, 0, 0] = 0x92  # low nibble 2 (+1.0), high nibble 9 (-0.5)
    values = dequantize_mxfp4(one, torch.tensor([[128]], dtype=torch.uint8), torch.float32)  # × 2^(128-127)
    assert values[0, :2].tolist() == [2.0, -1.0] and not values[0, 2:].any()


def _write_opengvlab(model: InternVLForConditionalGeneration, folder: Path, mxfp4: bool = False) -> Path:
    """OpenGVLab's InternVLChatModel around GptOssForCausalLM, as save_pretrained of its code writes it; with
    ``mxfp4`` the experts' matrices as openai releases them (MXFP4 blocks and scales), the model's own experts replaced
    by the dequantised values so that the reference computes with the same weights."""
    folder.mkdir()
    state, out = model.state_dict(), {}
    for name, tensor in state.items():
        if name.startswith("model.vision_tower."):
            rest = _replace_all(name[len("model.vision_tower.") :], VISION_TO_OPENGVLAB)
            if ".attention.q_proj." in rest:  # fuse [q; k; v]
                parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out["vision_model." + rest.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
            elif ".attention.k_proj." not in rest and ".attention.v_proj." not in rest:
                out["vision_model." + rest] = tensor
        elif name.startswith("model.multi_modal_projector."):
            rest = name[len("model.multi_modal_projector.") :]
            out["mlp1." + rest.replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")] = tensor
        elif name.startswith("model.language_model."):
            key = "language_model.model." + name[len("model.language_model.") :]
            if mxfp4 and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = _mxfp4(tuple(tensor.transpose(1, 2).shape), seed=len(out))
                with torch.no_grad():
                    tensor.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                out[key + "_blocks"], out[key + "_scales"] = blocks, scales
            else:
                out[key] = tensor
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = tensor
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    v, t = model.config.vision_config, model.config.text_config
    llm = {  # transformers 4.55's GptOssConfig.to_dict (the release's version): rope_scaling and rope_theta
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim, "num_local_experts": t.num_local_experts, "num_experts_per_tok": t.num_experts_per_tok,
        "experts_per_token": t.num_experts_per_tok, "swiglu_limit": t.swiglu_limit, "sliding_window": t.sliding_window,
        "layer_types": LAYER_TYPES, "rms_norm_eps": t.rms_norm_eps, "attention_bias": True, "hidden_act": "silu",
        "rope_theta": 150_000.0, "rope_scaling": {"rope_type": "yarn", **YARN}, "max_position_embeddings": 128,
        "initial_context_length": 16, "router_aux_loss_coef": 0.9, "tie_word_embeddings": False,
        "output_router_logits": False,
    }  # fmt: skip
    if mxfp4:
        llm["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    raw = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": IMAGE_SIZE,
        "template": "internvl3_5_gpt_oss", "tie_word_embeddings": False, "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "patch_size": 14, "image_size": IMAGE_SIZE,
            "hidden_act": "gelu", "initializer_factor": 0.1, "drop_path_rate": 0.0,
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw))
    return _tokenizer_folder(folder)


@pytest.mark.parametrize("mxfp4", [False, True])
def test_opengvlab_checkpoint_gives_the_same_logits_as_transformers(tmp_path, mxfp4):
    reference = _transformers_model()
    folder = _write_opengvlab(reference, tmp_path / "opengvlab", mxfp4=mxfp4)
    spec = read_config(folder)
    assert (spec.layout, spec.text_architecture, spec.template) == ("opengvlab", "gpt_oss", "internvl3_5_gpt_oss")
    assert spec.language.rope_scaling.original_max_position_embeddings == 16
    ours = load_vlm(folder)
    assert ours.decoder.layers[0].mlp.experts.gate_up_proj.dtype == (torch.bfloat16 if mxfp4 else torch.float32)
    ours.float()  # MXFP4 dequantises exactly to bfloat16; compare in float32
    _assert_same_as_transformers(reference, ours, f"OpenGVLab layout, GPT-OSS{' MXFP4' if mxfp4 else ''} + 300m")


def test_export_round_trip_loads_in_transformers_with_our_logits(tmp_path):
    reference = _transformers_model()
    reference.save_pretrained(str(tmp_path / "saved"))
    ours = load_vlm(tmp_path / "saved")
    out = export_vlm(ours, tmp_path / "export", tokenizer_dir=_tokenizer_folder(tmp_path / "tokenizer"))
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["model_type"] == "gpt_oss" and text["layer_types"] == LAYER_TYPES and text["sliding_window"] == 4
    assert text["rope_parameters"]["rope_type"] == "yarn" and text["intermediate_size"] == 32
    exported = InternVLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    diff = _max_diff(exported, ours, *_inputs())
    print(f"\n[export round trip, GPT-OSS] max |Δlogit| = {diff:.2e}")
    assert diff <= TOLERANCE
    again = read_vlm_state_dict(out)
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())
    saved = read_vlm_state_dict(tmp_path / "saved")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_export_refuses_what_transformers_gpt_oss_cannot_say(tmp_path):
    reference = _transformers_model()
    reference.save_pretrained(str(tmp_path / "saved"))
    ours = load_vlm(tmp_path / "saved")
    ours.decoder.config.o_bias = False
    with pytest.raises(ValueError, match="q/k/v and o_proj biases go together"):
        export_vlm(ours, tmp_path / "export")


def test_a_llama_checkpoint_with_yarn_loads_and_exports_with_transformers_logits(tmp_path):
    """YaRN is read for any text model now (it used to be refused): a LLaMA with YaRN rope parameters."""
    from transformers import LlamaConfig

    text = LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16},
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=_vision_config("300m"), text_config=text, image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = InternVLForConditionalGeneration(config)
    reference.set_attn_implementation("eager")
    _randomise(reference)
    reference.eval().save_pretrained(str(tmp_path / "saved"))
    ours = load_vlm(tmp_path / "saved")
    scaling = ours.decoder.config.rope_scaling
    assert (scaling.factor, scaling.original_max_position_embeddings, scaling.truncate) == (4.0, 16, True)
    assert _max_diff(reference, ours, *_inputs()) <= TOLERANCE
    out = export_vlm(ours, tmp_path / "export")
    exported = InternVLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    assert exported.config.text_config.rope_parameters["rope_type"] == "yarn"
    assert _max_diff(exported, ours, *_inputs()) <= TOLERANCE
