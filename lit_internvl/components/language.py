"""LLaMA-family transformers in one file: the causal language decoder and the text encoder.

One block serves both: RMSNorm → attention (GQA, RoPE, optional qkv bias as in Qwen2, optional per-head RMSNorm of
queries and keys as in Qwen3) → RMSNorm → SwiGLU, or a mixture of SwiGLU experts (Qwen3-MoE, GPT-OSS;
:mod:`lit_internvl.components.moe`) in the layers ``LanguageConfig.moe`` makes sparse. GPT-OSS's attention options
(transformers' ``gpt_oss/modeling_gpt_oss.py``) are fields of the same config: a bias on ``o_proj``, learned attention
sinks (``self_attn.sinks``), sliding-window layers (``layer_types``) and YaRN rotary scaling (``rope_scaling``); at
their defaults the block is the LLaMA/Qwen2 one. The :class:`Decoder` runs it causally with an LM head (tied or
untied); the :class:`TextEncoder` runs it bidirectionally and pools a sentence embedding (the text tower of the
contrastive stage, later the trunk of QLLaMA). Parameter names follow transformers' LLaMA/Qwen2/Qwen3
(``embed_tokens``, ``layers.N.self_attn.q_proj``, ``self_attn.q_norm``, ``mlp.gate_proj``,
``mlp.experts.gate_up_proj``, ...), so their weights load by name.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import Backend, attention, backends_for, check_backend, make_mask
from lit_internvl.components.layers import RMSNorm, fused_linear
from lit_internvl.components.moe import MoEConfig, SparseMoE, load_balancing_loss
from lit_internvl.components.rotary import RopeScaling, RotaryEmbedding, apply_rotary
from lit_internvl.components.sequence_parallel import SequenceParallel

LayerType = Literal["full_attention", "sliding_attention"]


@dataclass
class LanguageConfig:
    vocab_size: int = 151674
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    head_dim: int | None = None  # hidden_size // num_heads when None
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = True
    tie_embeddings: bool = False
    attn_backend: Backend = "sdpa"
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    moe: MoEConfig | None = None  # experts in the layers it makes sparse (Qwen3-MoE); None: dense everywhere
    o_bias: bool = False  # a bias on o_proj too (GPT-OSS)
    # The window of the layers that layer_types marks "sliding_attention" (None: every layer full, as transformers'
    # layer_types): a query sees the sliding_window latest tokens, itself included.
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    attention_sinks: bool = False  # a learned logit per head in every query's softmax (self_attn.sinks, GPT-OSS)
    rope_scaling: RopeScaling | None = None  # YaRN (GPT-OSS); None: plain RoPE

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            unknown = sorted(set(self.layer_types) - set(get_args(LayerType)))
            if unknown:
                raise ValueError(f"Unknown layer_types {unknown}; choose from {get_args(LayerType)}")
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_layers {self.num_layers}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError(
                    f"layer_types has 'sliding_attention' layers but sliding_window is {self.sliding_window}"
                )
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
            if "sliding_attention" not in (self.layer_types or ()):
                raise ValueError(f"sliding_window {self.sliding_window} is set but layer_types marks no sliding layer")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None for full attention."""
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @classmethod
    def from_name(cls, name: LanguagePreset, **overrides) -> LanguageConfig:
        if name not in LANGUAGE_PRESETS:
            raise ValueError(f"Unknown language-model preset {name!r}; known: {sorted(LANGUAGE_PRESETS)}")
        return replace(deepcopy(LANGUAGE_PRESETS[name]), **overrides)  # a preset's MoEConfig is not shared


LANGUAGE_PRESETS: dict[str, LanguageConfig] = {
    # The language model of InternVL3-1B (Qwen2.5-0.5B with InternVL's extra special tokens).
    "InternVL3-1B": LanguageConfig(),
    # InternVL3-2B / -8B: Qwen2.5-1.5B / -7B, vocabulary 151674, untied head.
    "InternVL3-2B": LanguageConfig(
        hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960
    ),
    "InternVL3-8B": LanguageConfig(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944
    ),
    # InternVL2.5-8B: InternLM2.5-7B-chat (no qkv bias, RMSNorm eps 1e-5), vocabulary 92553.
    "InternVL2.5-8B": LanguageConfig(
        vocab_size=92553,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        norm_eps=1e-5,
        qkv_bias=False,
    ),
    # The embedded default: byte-level vocabulary (256 bytes + specials), CPU-sized.
    "tiny": LanguageConfig(
        vocab_size=272,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        rope_theta=10_000.0,
        tie_embeddings=True,
    ),
}
# The SFT and MPO recipes' decoder: the "shapes" tokenizer's vocabulary (bytes, specials and the shapes world's
# 63 words, each also with a leading space), and a key/value head per query head: finding the object a question
# names is a lookup by content, which needs key capacity (BENCHMARKS.md, "Embedded-default design choices").
LANGUAGE_PRESETS["tiny-shapes"] = replace(LANGUAGE_PRESETS["tiny"], vocab_size=394, num_kv_heads=4)


def _qwen3(**fields) -> LanguageConfig:
    """InternVL3.5's Qwen3 language models. The values are the Qwen3 base models' (config.json of Qwen/Qwen3-*): head
    dim 128, no qkv bias, qk-norm, RMSNorm eps 1e-6, rope_theta 1e6, and Qwen3's vocabulary of 151936 rows, which
    InternVL3.5 keeps (xtuner's InternVL3.5 configs, which load the released weights, have 151936; InternVL's
    <img>, </img>, <IMG_CONTEXT>, ... tokens take ids 151669–151677 inside it). InternVL3.5 unties the head of every
    size, the 0.6B, 1.7B and 4B too, whose Qwen3 bases tie it: the language parameter counts of InternVL3.5's model
    table (0.8B, 2.0B, 4.4B; docs/en/internvl3.5/quick_start.md) are the untied ones (tied: 0.6B, 1.7B, 4.0B), and
    xtuner's InternVL3.5-1B text config notes "the official one is False". The released llm_config files themselves
    could not be read here: these are the base models' values wherever InternVL3.5 is not known to differ."""
    return LanguageConfig(vocab_size=151936, head_dim=128, qkv_bias=False, qk_norm=True, rope_theta=1e6, **fields)


LANGUAGE_PRESETS.update({
    "InternVL3.5-1B": _qwen3(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=3072),
    "InternVL3.5-2B": _qwen3(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144),
    "InternVL3.5-4B": _qwen3(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=9728),
    "InternVL3.5-8B": _qwen3(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12288),
    "InternVL3.5-14B": _qwen3(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, intermediate_size=17408),
    # Qwen3-32B.
    "InternVL3.5-38B": _qwen3(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, intermediate_size=25600),
    # Qwen3-30B-A3B: 128 experts of width 768 in every layer, 8 a token (norm_topk_prob); its dense intermediate_size
    # 6144 is unused (no mlp_only_layers). No load-balancing loss: InternVL's SFT and MPO code turns the router
    # logits on for GPT-OSS only (internvl_chat_gpt_oss/internvl/train/internvl_chat_finetune.py L950-957,
    # internvl_chat_mpo.py L983) and Qwen3-30B-A3B's config has output_router_logits false, so its
    # router_aux_loss_coef 0.001 never applies (modeling_internvl_chat.py L238-250 adds the loss only when the
    # logits are output). A run that wants the loss sets the coefficient.
    "InternVL3.5-30B-A3B": _qwen3(
        hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, intermediate_size=6144,
        moe=MoEConfig(num_experts=128, top_k=8, intermediate_size=768, aux_loss_coef=0.0),
    ),
    # Qwen3-235B-A22B: 128 experts of width 1536, 8 a token; no load-balancing loss, as 30B-A3B.
    "InternVL3.5-241B-A28B": _qwen3(
        hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4, intermediate_size=12288,
        moe=MoEConfig(num_experts=128, top_k=8, intermediate_size=1536, aux_loss_coef=0.0),
    ),
})  # fmt: skip
# The tiny Qwen3 twin of "tiny-shapes": the shapes vocabulary, qk-norm, no qkv bias, and a head_dim (48) unlike
# hidden / heads (32), as Qwen3's 128 is unlike theirs.
LANGUAGE_PRESETS["tiny-qwen3"] = replace(LANGUAGE_PRESETS["tiny-shapes"], head_dim=48, qkv_bias=False, qk_norm=True)
# ...and its mixture-of-experts twin: every MLP 8 experts of width 192, 2 a token, so that a token's active width is
# tiny-qwen3's 384.
LANGUAGE_PRESETS["tiny-moe"] = replace(
    LANGUAGE_PRESETS["tiny-qwen3"], moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=192)
)

# GPT-OSS-20B (openai/gpt-oss-20b's config.json), the language model of InternVL3.5-20B-A4B, whose vocabulary of 201088
# rows already has room for InternVL's tokens (InternVL3.5's model table gives it 20.9B language parameters,
# GPT-OSS-20B's count): q/k/v/o biases, sinks, sliding (128) and full layers alternating, YaRN (factor 32 over 4096
# positions, not truncated), RMSNorm eps 1e-5, rope_theta 150000; 32 experts of width 2880 in every layer, 4 a
# token, clamped SwiGLU (limit 7), router_aux_loss_coef 0.9. Its dense intermediate_size is unused.
LANGUAGE_PRESETS["InternVL3.5-20B-A4B"] = LanguageConfig(
    vocab_size=201088, hidden_size=2880, num_layers=24, num_heads=64, num_kv_heads=8, head_dim=64,
    intermediate_size=2880, norm_eps=1e-5, rope_theta=150_000.0, qkv_bias=True, o_bias=True, attention_sinks=True,
    sliding_window=128, layer_types=("sliding_attention", "full_attention") * 12,
    rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=4096, truncate=False),
    moe=MoEConfig(num_experts=32, top_k=4, intermediate_size=2880, aux_loss_coef=0.9, style="gpt_oss"),
)  # fmt: skip
# The tiny GPT-OSS twin of "tiny-shapes": its vocabulary and width, a head_dim (48) unlike hidden / heads, biases, sinks,
# a sliding window (32) shorter than its samples on every other layer, YaRN (factor 4 over 64 positions), and 8
# experts of width 192, 2 a token, with GPT-OSS's router and clamped SwiGLU.
LANGUAGE_PRESETS["tiny-gpt-oss"] = replace(
    LANGUAGE_PRESETS["tiny-shapes"], head_dim=48, o_bias=True, attention_sinks=True, sliding_window=32,
    layer_types=("sliding_attention", "full_attention"),
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64, truncate=False),
    moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=192, style="gpt_oss"),
)  # fmt: skip


LanguagePreset = Literal[
    "InternVL3-1B", "InternVL3-2B", "InternVL3-8B", "InternVL2.5-8B", "tiny", "tiny-shapes",
    "InternVL3.5-1B", "InternVL3.5-2B", "InternVL3.5-4B", "InternVL3.5-8B", "InternVL3.5-14B", "InternVL3.5-38B",
    "InternVL3.5-30B-A3B", "InternVL3.5-241B-A28B", "tiny-qwen3", "tiny-moe", "InternVL3.5-20B-A4B", "tiny-gpt-oss",
]  # fmt: skip


def _as_config(config: LanguageConfig | LanguagePreset) -> LanguageConfig:
    return LanguageConfig.from_name(config) if isinstance(config, str) else config


class KVCache:
    """Keys and values of the positions already seen, one entry per layer, for incremental decoding.

    Layer ``i`` appends its new ``(B, Hkv, T, D)`` keys and values with :meth:`update` and attends
    over everything cached; :attr:`length` is the number of cached positions.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. after some sequences finished)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]


class SelfAttention(nn.Module):
    def __init__(self, config: LanguageConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.attn_backend = config.attn_backend
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias)
        # Qwen3: each head's queries and keys RMS-normalised over head_dim (weights shared by the heads), before RoPE.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.fuse_projections = False  # q, k, v by one matmul (set_fused_projections)
        self.window = config.window(layer)
        self.sinks = nn.Parameter(torch.zeros(config.num_heads)) if config.attention_sinks else None
        features = (("sinks",) if config.attention_sinks else ()) + (("sliding_window",) if self.window else ())
        if features:  # the backends that cannot honour them are refused now, not at the first forward
            self.attention_features, self.attention_backends = features, backends_for(features)
            check_backend(self, config.attn_backend)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        projections = [self.q_proj, self.k_proj, self.v_proj]
        q, k, v = fused_linear(x, projections) if self.fuse_projections else (p(x) for p in projections)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache[0].update(cache[1], k, v)
        out = attention(
            q, k, v, mask, is_causal=is_causal, backend=self.attn_backend, sinks=self.sinks, window=self.window
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fuse_projections = False  # gate and up by one matmul (set_fused_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_projections:
            gate, up = fused_linear(x, [self.gate_proj, self.up_proj])
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def set_fused_projections(model: nn.Module, fused: bool = True) -> nn.Module:
    """Compute every decoder block's q/k/v and gate/up projections by one matmul each
    (:func:`~lit_internvl.components.layers.fused_linear`); weights, names and checkpoints stay as they are.
    Off by default: under FSDP2 the stacked copy a block saves for backward is not freed with the resharded weights."""
    for module in model.modules():
        if isinstance(module, (SelfAttention, SwiGLU)):
            module.fuse_projections = fused
    return model


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the MLP is a :class:`~lit_internvl.components.moe.SparseMoE`
    in the layers (``layer``: this block's index) that ``config.moe`` makes sparse, a :class:`SwiGLU` elsewhere."""

    def __init__(self, config: LanguageConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = SelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        sparse = config.moe is not None and config.moe.is_sparse(layer)
        self.mlp = SparseMoE(config.hidden_size, config.moe) if sparse else SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token embeddings + blocks + final norm, shared by :class:`Decoder` and :class:`TextEncoder`."""

    def __init__(self, config: LanguageConfig, causal: bool) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.attn_backend = config.attn_backend  # the masks' form; the blocks' attentions keep the same name
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> torch.Tensor:
        """Token ids ``(B, T)`` or embeddings ``(B, T, D)`` → final hidden states ``(B, T, D)``.

        ``positions`` (float ``(B, T)``) default to ``past..past+T-1``; packed sequences pass
        positions that restart per document together with ``document_ids``. With a ``cache`` the
        inputs are the next ``T`` positions after the cached ones and ``attention_mask`` covers
        all of them (cached + new).

        With ``sequence_parallel`` the rows are split over its group
        (:mod:`~lit_internvl.components.sequence_parallel`): the inputs and ``positions`` are this rank's slice
        ``(B, T/sp)`` of every row, ``attention_mask`` and ``document_ids`` cover the whole rows ``(B, T)``, and the
        result is the slice's hidden states ``(B, T/sp, D)``.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = 0 if cache is None else cache.length
        if sequence_parallel is not None and (cache is not None or positions is None):
            raise ValueError("A decoder split over a sequence-parallel group needs its slice's positions and no cache")
        if positions is None:
            positions = torch.arange(past, past + x.shape[1], device=x.device, dtype=torch.float32).expand(
                x.shape[0], -1
            )
        rope = self.rotary(positions)
        backend = self.attn_backend
        if cache is not None and backend == "varlen":
            backend = "sdpa"  # a few new queries over cached keys: a dense mask, which varlen passes on to SDPA
        if cache is not None and backend not in ("sdpa", "eager"):
            raise ValueError(f"Incremental decoding runs on the 'sdpa' or 'eager' backend, not {backend!r}")
        # One mask for every layer; flex holds the sliding window in its block mask, so it gets one per window.
        windows = {layer.self_attn.window for layer in self.layers} if backend == "flex" else {None}
        masks = {
            window: make_mask(
                backend,
                causal=self.causal,
                attention_mask=attention_mask,
                document_ids=document_ids,
                # the whole rows' length: under sequence parallelism x holds this rank's slice of them
                length=past + x.shape[1] * (sequence_parallel.size if sequence_parallel is not None else 1),
                window=window,
            )
            for window in windows
        }
        # The positions that count for the load-balancing loss of MoE layers (Decoder.aux_loss): padding does not.
        self.routed_positions = (
            attention_mask if document_ids is None or attention_mask is not None else document_ids >= 0
        )
        self.sequence_parallel = sequence_parallel  # the group the router statistics of aux_loss are summed over
        if sequence_parallel is not None:  # the whole rows' masks, for attention after the exchange
            masks = {window: sequence_parallel.split_mask(mask) for window, mask in masks.items()}
            routed = self.routed_positions
            if routed is not None:
                self.routed_positions = routed[:, sequence_parallel.columns(routed.shape[1])]
        for index, layer in enumerate(self.layers):
            mask = masks[layer.self_attn.window if backend == "flex" else None]
            x = layer(x, rope, mask, self.causal, None if cache is None else (cache, index))
        return self.norm(x)


class Decoder(Transformer):
    """Causal language model.

    Contract (every decoder): ``forward(input_ids | inputs_embeds, attention_mask, positions,
    document_ids) → hidden (B, T, hidden_size)``; ``head(hidden) → logits (B, T, vocab_size)``, a linear map by
    ``head_weight (vocab_size, hidden_size)`` (which the chunked head + loss reads); ``embed_tokens`` maps ids to
    ``(B, T, hidden_size)``.
    """

    def __init__(self, config: LanguageConfig | LanguagePreset = "tiny") -> None:
        config = _as_config(config)
        super().__init__(config, causal=True)
        self.hidden_size = config.hidden_size
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """``(vocab_size, hidden_size)``: the output head's weight (the embeddings' when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight)

    def aux_loss(self, attention_mask: torch.Tensor | None = None, all_reduce: bool = False) -> torch.Tensor | None:
        """The load-balancing loss of the last forward's MoE layers (transformers' ``load_balancing_loss_func`` over
        all of them: :func:`~lit_internvl.components.moe.load_balancing_loss`), None for a decoder without experts.

        ``attention_mask`` ``(B, T)``: the positions that count; default those the last forward attended (its attention
        mask, or the document ids ≥ 0 of packed rows), as transformers' Qwen3MoeForCausalLM passes its own mask.
        ``all_reduce``: over the global batch (see the function)."""
        layers = [module for module in self.modules() if isinstance(module, SparseMoE)]
        if not layers:
            return None
        if any(layer.router_logits is None for layer in layers):
            raise ValueError("Decoder.aux_loss reads the router logits of a forward pass: run one first")
        mask = attention_mask if attention_mask is not None else getattr(self, "routed_positions", None)
        moe = self.config.moe
        logits = [layer.router_logits for layer in layers]
        split = getattr(self, "sequence_parallel", None)  # the last forward's rows were split over this group
        return load_balancing_loss(logits, moe.num_experts, moe.top_k, mask, all_reduce, split)


TextPooling = Literal["mean", "last"]


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: TextPooling) -> torch.Tensor:
    """``(N, T, D)`` → ``(N, D)``: ``"mean"`` over real tokens, or the ``"last"`` real token (e.g. an end token)."""
    if pooling == "last":
        last = attention_mask.long().sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling != "mean":
        raise ValueError(f"Unknown text pooling {pooling!r}; choose one of {get_args(TextPooling)}")
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextEncoder(Transformer):
    """Text tower: the decoder's blocks, read bidirectionally (``causal=False``) or causally, pooled to one vector.

    InternVL-C's text tower is a causal LLaMA (QLLaMA) whose embedding is the last real token's state of
    ``"summarize:" + caption`` and an end token (``causal=True, pooling="last"``); the bidirectional
    mean-pooled tower is the BERT-like option.

    Contract (every text encoder): ``forward(input_ids (B, T), attention_mask (B, T)) → (B, hidden_size)``.
    ``pooling``: see :func:`pool_text`.
    """

    def __init__(
        self, config: LanguageConfig | LanguagePreset = "tiny", pooling: TextPooling = "mean", causal: bool = False
    ) -> None:
        if pooling not in get_args(TextPooling):
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {get_args(TextPooling)}")
        config = _as_config(config)
        super().__init__(config, causal=causal)
        self.hidden_size = config.hidden_size
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return pool_text(super().forward(input_ids, attention_mask=attention_mask), attention_mask, self.pooling)
