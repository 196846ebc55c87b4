"""Real checkpoints: a transformers or OpenGVLab InternVL folder loads into lit_internvl with the same
logits and the same greedy tokens as transformers; an export loads back into transformers with the
same logits; real sizes have transformers' parameter counts; nothing in a checkpoint folder runs.

The checkpoints are tiny random models built offline with transformers; the OpenGVLab layout is
written here from a transformers model with the mapping of shared/reference/internvl3-1b.md, not
with lit_internvl.hf's own tables.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from lit_internvl import checkpoints
from lit_internvl.checkpoints import load_into
from lit_internvl.components import InternViTConfig, LanguageConfig
from lit_internvl.components.moe import MoEConfig
from lit_internvl.data.tokenizer import HFTokenizer
from lit_internvl.hf import (
    UnsupportedCheckpointError,
    build_vlm,
    export_vlm,
    load_state_exactly,
    load_vlm,
    read_config,
    read_vlm_state_dict,
    split_wqkv,
    transformers_config,
)
from lit_internvl.models.builders import INTERNVL_PRESETS, internvl, vlm_from_configs
from lit_internvl.models.vlm import Logits
from lit_internvl.tools.export import main as export_main

IMAGE_TOKEN = 145  # <IMG_CONTEXT> of the test tokenizer below
IMAGE_SIZE, TOKENS_PER_TILE = 112, 16  # 8×8 patches of 14 px, pixel-shuffled to 4×4
TOLERANCE = 1e-4


# -- tiny transformers models ------------------------------------------------------------------------------------


def _vision_config(style: str) -> InternVLVisionConfig:
    common = dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=IMAGE_SIZE,
        patch_size=14,
    )  # fmt: skip
    if style == "300m":  # LayerNorm, qkv bias, no qk-norm
        return InternVLVisionConfig(norm_type="layer_norm", attention_bias=True, use_qk_norm=False, **common)
    return InternVLVisionConfig(norm_type="rms_norm", attention_bias=False, use_qk_norm=True, **common)  # 6B style


# Qwen3 and Qwen3-MoE at shapes no other test has: 3 query heads over 1 key/value head, head_dim 40 ≠ 72 / 3; for the
# MoE, 5 experts of width 36, 2 a token, the middle layer dense (mlp_only_layers), norm_topk_prob off (transformers'
# default, where lit_internvl's is on: a field not read would show).
QWEN3_DIMS = dict(
    vocab_size=152, hidden_size=72, intermediate_size=88, num_hidden_layers=3, num_attention_heads=3,
    num_key_value_heads=1, head_dim=40, rope_theta=1e6,
)  # fmt: skip
QWEN3_MOE = dict(
    num_experts=5, num_experts_per_tok=2, moe_intermediate_size=36, mlp_only_layers=[1], norm_topk_prob=False
)


def _text_config(kind: str):
    if kind == "qwen3":
        return Qwen3Config(**QWEN3_DIMS)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**QWEN3_DIMS, **QWEN3_MOE)
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e6,
        )  # fmt: skip
    # LLaMA, no biases; head_dim ≠ hidden/heads except for "internlm2" (a LLaMA that InternLM2 can express).
    return LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16 if kind == "internlm2" else 32, rms_norm_eps=1e-5,
    )  # fmt: skip


def _transformers_model(text: str, vision: str, tie: bool, seed: int = 0) -> InternVLForConditionalGeneration:
    config = InternVLConfig(
        vision_config=_vision_config(vision), text_config=_text_config(text), image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    if text == "qwen3_moe":
        model.set_experts_implementation("eager")  # transformers' loop over experts, the plainest reference
    _randomise(model)
    return model.eval()


def _randomise(model: torch.nn.Module) -> None:
    """Every weight random (norms and LayerScale around 1, the rest around 0), so no swap goes unseen."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = ("norm" in name and name.endswith("weight")) or "lambda" in name or name.endswith(("ls1", "ls2"))
            if param.ndim == 1 and scale:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, one image tile each: text, <IMG_CONTEXT>×16, text."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        text = torch.randint(0, 140, (8,), generator=generator)
        rows.append(torch.cat([text[:3], torch.full((TOKENS_PER_TILE,), IMAGE_TOKEN), text[3:]]))
    return torch.stack(rows), torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def _max_diff(reference, ours, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        return (expected - ours(input_ids, pixel_values, head=Logits())).abs().max().item()


def _greedy(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: re-run the whole sequence for every new token."""
    for _ in range(steps):
        next_token = model(input_ids, pixel_values, head=Logits())[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


def _assert_same_as_transformers(reference, ours, label: str) -> float:
    input_ids, pixel_values = _inputs()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits
        got = ours(input_ids, pixel_values, head=Logits())
        diff = (expected - got).abs().max().item()
        print(f"\n[{label}] max |Δlogit| = {diff:.2e} (logit scale {expected.abs().max().item():.2f})")
        assert diff <= TOLERANCE, f"{label}: logits differ by {diff}"
        reference.generation_config.eos_token_id = None
        reference.generation_config.pad_token_id = 0
        generated = reference.generate(
            input_ids=input_ids[:1], pixel_values=pixel_values[:1], max_new_tokens=8, do_sample=False
        )  # fmt: skip
        assert torch.equal(_greedy(ours, input_ids[:1], pixel_values[:1], 8), generated), label
    return diff


def _tokenizer_folder(folder: Path) -> Path:
    """A word-level tokenizer with InternVL's special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(140)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    fast.save_pretrained(str(folder))
    assert fast.convert_tokens_to_ids("<IMG_CONTEXT>") == IMAGE_TOKEN
    return folder


# -- the OpenGVLab layout, written from a transformers model (reference/internvl3-1b.md) -----------------------

VISION_TO_OPENGVLAB = [
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
    ("encoder.layer.", "encoder.layers."),
    ("attention.projection_layer", "attn.proj"),
    ("attention.q_norm", "attn.q_norm"),
    ("attention.k_norm", "attn.k_norm"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
]
LLAMA_TO_INTERNLM2 = [
    ("embed_tokens", "tok_embeddings"),
    ("self_attn.o_proj", "attention.wo"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"),
    ("mlp.down_proj", "feed_forward.w2"),
    ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
]


def _replace_all(name: str, table) -> str:
    for old, new in table:
        name = name.replace(old, new)
    return name


def _write_opengvlab(model, folder: Path, text: str, grouped_wqkv: bool = True) -> Path:
    """``text``: "qwen2" (Qwen2 names kept) or "internlm2" (a LLaMA model renamed, q/k/v fused into ``wqkv``)."""
    folder.mkdir()
    config = model.config
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
            rest = name[len("model.language_model.") :]
            if rest.endswith("mlp.experts.gate_up_proj"):  # per expert, as the Qwen3-MoE releases store them
                for e, matrix in enumerate(tensor):
                    gate, up = matrix.chunk(2)
                    base = "language_model.model." + rest.replace("gate_up_proj", str(e))
                    out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate.clone(), up.clone()
            elif rest.endswith("mlp.experts.down_proj"):
                for e, matrix in enumerate(tensor):
                    out["language_model.model." + rest.replace("down_proj", f"{e}.down_proj.weight")] = matrix.clone()
            elif text in ("qwen2", "qwen3", "qwen3_moe"):
                out["language_model.model." + rest] = tensor
            elif ".self_attn.q_proj." in rest:
                t = config.text_config
                groups, head_dim = t.num_attention_heads // t.num_key_value_heads, t.head_dim
                q, k, v = (state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
                if grouped_wqkv:  # per kv head: [q_1 … q_g, k, v]
                    q = q.reshape(t.num_key_value_heads, groups, head_dim, -1)
                    k, v = (x.reshape(t.num_key_value_heads, 1, head_dim, -1) for x in (k, v))
                    wqkv = torch.cat([q, k, v], dim=1).reshape(-1, t.hidden_size)
                else:  # a plausible but wrong layout: [q; k; v]
                    wqkv = torch.cat([q, k, v])
                out["language_model.model." + rest.replace("self_attn.q_proj", "attention.wqkv")] = wqkv
            elif ".self_attn.k_proj." not in rest and ".self_attn.v_proj." not in rest:
                out["language_model.model." + _replace_all(rest, LLAMA_TO_INTERNLM2)] = tensor
        elif name == "lm_head.weight":
            out["language_model.output.weight" if text == "internlm2" else "language_model.lm_head.weight"] = tensor
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    v, t = config.vision_config, config.text_config
    llm = {
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
        "rope_theta": t.rope_parameters["rope_theta"], "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "max_position_embeddings": 32768, "tie_word_embeddings": False,
    }  # fmt: skip
    if text == "qwen2":
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    elif text == "qwen3":
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=t.head_dim, attention_bias=False)
    elif text == "qwen3_moe":
        llm.update(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=t.head_dim, attention_bias=False,
            decoder_sparse_step=1, router_aux_loss_coef=0.001, output_router_logits=False, **QWEN3_MOE,
        )  # fmt: skip
    else:
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
        llm["auto_map"] = {"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"}
    raw = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": IMAGE_SIZE,
        "template": "internvl2_5", "tie_word_embeddings": False, "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "patch_size": 14, "image_size": IMAGE_SIZE,
            "hidden_act": "gelu", "initializer_factor": 0.1, "drop_path_rate": 0.1,
        },
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw))
    return _tokenizer_folder(folder)


# -- parity --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, vision, tie",
    [("qwen2", "300m", False), ("llama", "6b", True), ("qwen3", "300m", True), ("qwen3_moe", "6b", False)],
)
def test_transformers_checkpoint_gives_the_same_logits_and_greedy_tokens(tmp_path, text, vision, tie):
    reference = _transformers_model(text, vision, tie)
    reference.save_pretrained(str(tmp_path / "saved"))  # names as saved: vision_tower.*, language_model.model.*
    ours = load_vlm(tmp_path / "saved")
    assert (ours.decoder.lm_head is None) == tie
    _assert_same_as_transformers(reference, ours, f"transformers layout, {text} + {vision}")

    # The in-memory names (model.vision_tower.*, model.language_model.*, lm_head) map to the same tensors.
    from safetensors.torch import save_file

    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, str(tmp_path / "memory" / "model.safetensors"))
    saved, memory = read_vlm_state_dict(tmp_path / "saved"), read_vlm_state_dict(tmp_path / "memory")
    assert saved.keys() == memory.keys() and all(torch.equal(saved[k], memory[k]) for k in saved)


def test_a_wrong_mapping_would_be_caught(tmp_path):
    """The parity check can fail: swapping k and v of one vision layer moves the logits far past the tolerance."""
    reference = _transformers_model("qwen2", "300m", tie=False)
    reference.save_pretrained(str(tmp_path))
    state = read_vlm_state_dict(tmp_path)
    q, k, v = state["vision.layers.0.attn.qkv.weight"].chunk(3)
    state["vision.layers.0.attn.qkv.weight"] = torch.cat([q, v, k])
    with torch.device("meta"):
        wrong = build_vlm(read_config(tmp_path))
    load_state_exactly(wrong, state, "swapped k/v")
    diff = _max_diff(reference, wrong, *_inputs())
    print(f"\n[vision k/v swapped] max |Δlogit| = {diff:.2e}")
    assert diff > 100 * TOLERANCE


def test_experts_stacked_in_another_order_would_be_caught(tmp_path):
    """Up rows before gate rows in one expert, or two experts swapped: the logits move far past the tolerance."""
    reference = _transformers_model("qwen3_moe", "300m", tie=False)
    reference.save_pretrained(str(tmp_path))
    spec = read_config(tmp_path)
    for change in ("gate/up", "experts"):
        state = read_vlm_state_dict(tmp_path, spec)
        name = "decoder.layers.0.mlp.experts.gate_up_proj"
        stacked = state[name].clone()
        if change == "gate/up":
            gate, up = stacked[1].chunk(2)
            stacked[1] = torch.cat([up, gate])
        else:
            stacked[[0, 3]] = stacked[[3, 0]]
        state[name] = stacked
        with torch.device("meta"):
            wrong = build_vlm(spec)
        load_state_exactly(wrong, state, change)
        diff = _max_diff(reference, wrong.eval(), *_inputs())
        print(f"\n[{change} swapped] max |Δlogit| = {diff:.2e}")
        assert diff > 100 * TOLERANCE


@pytest.mark.parametrize(
    "text, vision", [("qwen2", "300m"), ("internlm2", "6b"), ("qwen3", "6b"), ("qwen3_moe", "300m")]
)
def test_opengvlab_checkpoint_gives_the_same_logits_as_transformers(tmp_path, text, vision):
    reference = _transformers_model(text, vision, tie=False)
    folder = _write_opengvlab(reference, tmp_path / "opengvlab", text)
    spec = read_config(folder)
    assert (spec.layout, spec.text_architecture, spec.image_context_id, spec.template) == (
        "opengvlab", text, IMAGE_TOKEN, "internvl2_5",
    )  # fmt: skip
    ours = load_vlm(folder)
    _assert_same_as_transformers(reference, ours, f"OpenGVLab layout, {text} + {vision}")
    assert HFTokenizer(folder).tokenizer.chat_template.startswith("{% for m in messages %}")


def test_internlm2_wqkv_is_split_by_kv_group(tmp_path):
    """InternLM2's wqkv interleaves [q_1 … q_g, k, v] per kv head; reading it as [q; k; v] is caught."""
    config = LanguageConfig(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, num_layers=1, vocab_size=4)
    rows = torch.arange(2 * (2 + 2) * 2, dtype=torch.float32)[:, None].expand(-1, 8)  # row r holds r
    q, k, v = split_wqkv(rows, config)  # kv head 0: rows 0-7 = q1 q2 k v, kv head 1: rows 8-15
    assert q[:, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k[:, 0].tolist() == [4, 5, 12, 13] and v[:, 0].tolist() == [6, 7, 14, 15]

    reference = _transformers_model("internlm2", "6b", tie=False)
    folder = _write_opengvlab(reference, tmp_path / "flat", "internlm2", grouped_wqkv=False)
    diff = _max_diff(reference, load_vlm(folder), *_inputs())
    print(f"\n[wqkv read as [q; k; v]] max |Δlogit| = {diff:.2e}")
    assert diff > 100 * TOLERANCE


@pytest.mark.parametrize("kind", ["tiny-qwen2-tied", "llama-6b-untied-sharded", "tiny-qwen3-tied", "qwen3-moe-sharded"])
def test_export_round_trip_loads_in_transformers_with_our_logits(tmp_path, kind):
    torch.manual_seed(0)
    if kind.startswith("tiny"):
        model, shard = internvl("tiny" if kind == "tiny-qwen2-tied" else "tiny-qwen3"), 5 * 1024**3
    elif kind == "qwen3-moe-sharded":  # norm_topk_prob on (transformers' default is off: unwritten, it would show)
        moe = MoEConfig(num_experts=5, top_k=2, intermediate_size=36, mlp_only_layers=(1,), aux_loss_coef=0.01)
        language = LanguageConfig(
            vocab_size=152, hidden_size=72, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=88,
            head_dim=40, qkv_bias=False, qk_norm=True, moe=moe,
        )  # fmt: skip
        model, shard = (
            vlm_from_configs(InternViTConfig.from_name("tiny", image_size=IMAGE_SIZE), language, 145),
            64 * 1024,
        )
    else:
        vision = InternViTConfig(
            image_size=IMAGE_SIZE, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
            norm_type="rms_norm", qkv_bias=False, qk_norm=True,
        )  # fmt: skip
        language = LanguageConfig(
            vocab_size=160, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            head_dim=32, qkv_bias=False, rope_theta=5e5,
        )  # fmt: skip
        model, shard = vlm_from_configs(vision, language, IMAGE_TOKEN), 64 * 1024  # several shards + index
    _randomise(model)
    model.eval()
    tokenizer = _tokenizer_folder(tmp_path / "tokenizer")
    out = export_vlm(model, tmp_path / "export", tokenizer_dir=tokenizer, max_shard_bytes=shard)
    assert (out / "model.safetensors.index.json").exists() == (shard < 1024**2)
    assert (out / "tokenizer.json").exists() and HFTokenizer(out).tokenizer.chat_template is not None

    exported = InternVLForConditionalGeneration.from_pretrained(
        str(out), attn_implementation="eager", experts_implementation="eager"
    ).eval()
    tokens = model.tokens_per_tile()
    input_ids = torch.tensor([[5, 6] + [model.image_context_id] * tokens + [7, 8, 9]])
    size = model.vision.config.image_size
    pixel_values = torch.randn(1, 3, size, size)
    diff = _max_diff(exported, model, input_ids, pixel_values)
    print(f"\n[export round trip, {kind}] max |Δlogit| = {diff:.2e}")
    assert diff <= TOLERANCE
    # …and back: the export reads into lit_internvl with the very same tensors.
    again = read_vlm_state_dict(out)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    # The tensors are named as transformers' own save_pretrained names them (per-expert matrices for MoE).
    exported.save_pretrained(str(tmp_path / "resaved"))
    assert set(_tensor_names(out)) == set(_tensor_names(tmp_path / "resaved"))
    if kind == "qwen3-moe-sharded":
        text = exported.config.text_config
        assert (text.model_type, text.norm_topk_prob, text.router_aux_loss_coef) == ("qwen3_moe", True, 0.01)
        assert "language_model.model.layers.0.mlp.experts.4.up_proj.weight" in _tensor_names(out)


def _tensor_names(folder: Path) -> list[str]:
    from lit_internvl.hf.files import weight_names

    return weight_names(folder)


def test_export_command_from_a_lightning_checkpoint(tmp_path):
    """``python -m lit_internvl export --checkpoint X.ckpt --arch tiny --output DIR``; LoRA tensors are refused."""
    from lit_internvl.cli import main

    torch.manual_seed(0)
    model = internvl("tiny")
    _randomise(model)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "last.ckpt")
    main(["export", "--checkpoint", str(tmp_path / "last.ckpt"), "--arch", "tiny", "--output", str(tmp_path / "out")])
    exported = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    input_ids = torch.tensor([[1, 2] + [model.image_context_id] * model.tokens_per_tile() + [3]])
    pixel_values = torch.randn(1, 3, 56, 56)
    assert _max_diff(exported, model.eval(), input_ids, pixel_values) <= TOLERANCE

    state["model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, 128)
    torch.save({"state_dict": state}, tmp_path / "lora.ckpt")
    with pytest.raises(ValueError, match="merge the adapters"):
        export_main(["--checkpoint", str(tmp_path / "lora.ckpt"), "--arch", "tiny", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # a .ckpt without --arch: argparse explains and exits
        export_main(["--checkpoint", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "y")])


def test_export_at_the_trained_tile_size_computes_what_ours_computes(tmp_path):
    """An encoder native at 56 px that trained on 84 px tiles exports at 84 px: image_size 84, 9 tokens a tile,
    and the position table resized as our forward pass interpolates it, so transformers' logits at 84 px are ours."""
    torch.manual_seed(0)
    model = internvl("tiny")  # InternViT at 56 px: a 4×4 patch grid
    _randomise(model)
    model.tile_size = 84  # a 6×6 grid, pixel-shuffled to 3×3
    model.eval()
    out = export_vlm(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["image_size"] == [84, 84] and config["image_seq_length"] == 9

    exported = InternVLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    assert exported.model.vision_tower.embeddings.position_embeddings.shape[1] == 1 + 6 * 6
    input_ids = torch.tensor([[5, 6] + [model.image_context_id] * model.tokens_per_tile() + [7, 8, 9]])
    pixel_values = torch.randn(1, 3, 84, 84)
    diff = _max_diff(exported, model, input_ids, pixel_values)  # ours interpolates, theirs reads the resized table
    print(f"\n[export at 84 px of a 56 px encoder] max |Δlogit| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_export_command_uses_the_tile_size_the_run_recorded(tmp_path):
    """A .ckpt exports at the tile size its run recorded (checkpoints.read_model_facts), ``--tile-size``
    overrides it, a run that recorded none exports at the encoder's size, and an hf folder keeps its own."""
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in internvl("tiny").state_dict().items()}
    torch.save({"state_dict": state, checkpoints.MODEL_FACTS: {"tile_size": 84}}, tmp_path / "last.ckpt")
    torch.save({"state_dict": state}, tmp_path / "older.ckpt")  # written before the facts were kept

    def exported(checkpoint: str, output: str, *options: str) -> tuple[int, int]:
        export_main(["--checkpoint", str(tmp_path / checkpoint), "--output", str(tmp_path / output), *options])
        config = json.loads((tmp_path / output / "config.json").read_text())
        return config["vision_config"]["image_size"][0], config["image_seq_length"]

    assert exported("last.ckpt", "recorded", "--arch", "tiny") == (84, 9)
    assert exported("last.ckpt", "given", "--arch", "tiny", "--tile-size", "112") == (112, 16)
    assert exported("older.ckpt", "native", "--arch", "tiny") == (56, 4)
    assert exported("recorded", "from-folder") == (84, 9)


def test_init_from_hf_loads_every_tensor(tmp_path):
    """What ``init_from: hf:/path`` does in a stage: Stage.configure_model → read_init_weights → load_into."""
    from lit_internvl.stages.base import read_init_weights

    reference = _transformers_model("qwen2", "300m", tie=False)
    reference.save_pretrained(str(tmp_path))
    model = build_vlm(read_config(tmp_path))
    missing, unexpected = load_into(model, read_init_weights(f"hf:{tmp_path}"), f"hf:{tmp_path}")
    assert missing == [] and unexpected == []
    loaded = load_vlm(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


# -- sizes ---------------------------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "preset, tokenizer", [("tiny", "byte"), ("tiny-shapes", "shapes"), ("tiny-qwen3", "shapes"), ("tiny-moe", "shapes")]
)
def test_the_tiny_presets_fit_their_tokenizers(preset, tokenizer):
    from lit_internvl.data.tokenizer import IMG_CONTEXT, load_tokenizer

    tok, model = load_tokenizer(tokenizer), internvl(preset)
    assert model.image_context_id == tok.token_to_id(IMG_CONTEXT)
    assert model.decoder.embed_tokens.num_embeddings >= tok.vocab_size  # every id has an embedding


def test_internvl3_1b_has_938_193_024_parameters():
    with torch.device("meta"):
        model = internvl("InternVL3-1B")
    assert _count(model) == 938_193_024
    parts = (_count(model.vision), _count(model.connector), _count(model.decoder))
    assert parts == (304_012_288, 4_482_816, 629_697_920)  # as shared/reference/internvl3-1b.md lists them


# The Flash sizes have no transformers twin to count against: tests/test_hf_flash.py counts their extra parameters.
REAL_SIZES = sorted(name for name, preset in INTERNVL_PRESETS.items() if name != "tiny" and not preset.flash)


@pytest.mark.parametrize("name", REAL_SIZES + ["InternViT-6B + InternVL3-8B LLM"])
def test_real_sizes_count_as_many_parameters_as_transformers(name):
    with torch.device("meta"):
        if name in INTERNVL_PRESETS:
            ours = internvl(name)
        else:  # a 6B-style encoder at real size (InternVL 2.5/3 38B–78B pair it with larger LLMs)
            vision = InternViTConfig.from_name("InternViT-6B-448px-V1-5")
            ours = vlm_from_configs(vision, LanguageConfig.from_name("InternVL3-8B"), image_context_id=151667)
        theirs = InternVLForConditionalGeneration(transformers_config(ours))
    assert _count(ours) == _count(theirs)


# -- safety and refusals -------------------------------------------------------------------------------------------


def test_remote_code_in_the_folder_never_runs(tmp_path):
    marker = tmp_path / "remote_code_ran"
    folder = _write_opengvlab(_transformers_model("qwen2", "300m", tie=False), tmp_path / "ckpt", "qwen2")
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("configuration_internvl_chat", "modeling_internvl_chat", "tokenization_evil"):
        (folder / f"{module}.py").write_text(payload)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    load_vlm(folder)
    try:
        HFTokenizer(folder)
    except ValueError as error:  # refusing is fine too, as long as it says why
        assert "trust_remote_code" in str(error)
    assert not marker.exists()


class _Exploit:
    """Unpickling this calls ``open(marker, "w")``, creating the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_code_carrying_pickle_is_refused_without_running(tmp_path):
    reference = _transformers_model("qwen2", "300m", tie=False)
    reference.save_pretrained(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model.safetensors").unlink()
    # A plain-tensor pickle is read (weights_only=True accepts it)…
    torch.save(dict(reference.state_dict()), tmp_path / "ok" / "pytorch_model.bin")  # in-memory names
    _assert_same_as_transformers(reference, load_vlm(tmp_path / "ok"), "pytorch_model.bin")

    # …one that would run code is refused with a message, and nothing runs.
    marker = tmp_path / "pickle_code_ran"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save({"weight": _Exploit(marker)}, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(UnsupportedCheckpointError, match=r"weights_only=True\) refuses"):
        load_vlm(tmp_path / "bad")
    assert not marker.exists()


def _write_config(folder: Path, **text_changes) -> Path:
    folder.mkdir()
    config = InternVLConfig(vision_config=_vision_config("300m"), text_config=_text_config("llama")).to_dict()
    config["text_config"].update(text_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}, "Rope scaling 'linear'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"model_type": "gemma"}, "text_config.model_type 'gemma'"),
        ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=true"),
        ({"model_type": "qwen3_moe", "use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=true"),
    ],
)
def test_unsupported_features_are_refused_not_loaded_wrong(tmp_path, change, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        read_config(_write_config(tmp_path / "ckpt", **change))


def test_a_decoder_no_transformers_text_model_computes_is_not_exported():
    for changes in ({"qk_norm": True}, {"moe": MoEConfig(4, 2, 8), "qkv_bias": False}):  # with qkv bias; no qk-norm
        with pytest.raises(ValueError, match="No transformers text model has"):
            transformers_config(
                vlm_from_configs(InternViTConfig.from_name("tiny"), LanguageConfig.from_name("tiny", **changes), 261)
            )


def test_dynamic_rope_scaling_is_read_as_plain_rope(tmp_path, caplog):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}  # as InternVL3's published configs have
    folder = _write_config(tmp_path / "ckpt", rope_parameters=rope)
    assert read_config(folder).language.rope_theta == 1e6
    assert "dynamic NTK" in caplog.text
