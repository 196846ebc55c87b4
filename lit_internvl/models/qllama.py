"""QLLaMA (InternVL 1) and the models built around it: learnable queries that read an image through
cross-attention inside LLaMA blocks, the InternVL-G dual embedding, and QLLaMA as a connector.

QLLaMA's trunk is the LLaMA trunk of :mod:`lit_internvl.components.language` under the same
parameter names (``embed_tokens``, ``layers.N.self_attn.q_proj``, ``norm``, ...), so the stage-1 text
tower (a :class:`~lit_internvl.components.TextEncoder`) loads into it by a prefix rename; the query
tokens and the cross-attention layers (``layers.N.cross_attn.*``, every second block) are new.

One sequence holds the queries first, then the text::

    query_tokens (Q, D) ─┐
                         ├─► [q₁ … q_Q t₁ … t_T] ─► blocks ─► norm ─┬─► query hidden (N, Q, D)
    input_ids (N, T) ─► embed_tokens ─┘                              └─► text hidden  (N, T, D)

    block:  x ─► x + self_attn(norm(x), mask) ─┬─ queries ─► + cross_attn(queries, vision) ─┐
                                                └─ text ─────────────────────────────────────┴─► x + mlp(norm(x))

Who attends to whom is set by the mode (:func:`qllama_mask`): ``itc`` keeps queries and text apart
(each side is an encoder of its own modality), ``itm`` lets everything see everything, ``itg`` is a
prefix LM (text generated from the queries).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.attention import attention, causal_mask, check_backend
from lit_internvl.components.language import Block, KVCache, LanguageConfig, LanguagePreset, TextPooling, pool_text
from lit_internvl.components.layers import RMSNorm
from lit_internvl.components.rotary import RotaryEmbedding
from lit_internvl.distributed import on_every_rank
from lit_internvl.models.dual_encoder import AttentionPool, ImagePooling, image_projection

Mode = Literal["itc", "itm", "itg"]
# How the query outputs become InternVL-G's query embedding: InternVL's second attention pool
# (``clip_projector2``) or their mean through a linear map.
QueryPooling = Literal["attention", "mean"]
TextAttention = Literal["causal", "bidirectional"]
MODES, TEXT_ATTENTION = get_args(Mode), get_args(TextAttention)
# The named parameter sets of InternVLG (``lm_head`` only when untied), for freezing by name.
ParameterSet = Literal[
    "vision", "image_projection", "text_projection", "query_projection", "itm_head", "logit_scale",
    "trunk", "queries", "cross_attention", "lm_head",
]  # fmt: skip


def qllama_mask(
    mode: Mode,
    num_queries: int,
    attention_mask: torch.Tensor,
    text_attention: TextAttention = "causal",
) -> torch.Tensor:
    """The self-attention mask of a QLLaMA pass, ``(N, 1, Q+T, Q+T)``, True where a row may attend.

    ::

                  keys:  queries   text            queries   text            queries   text
        itc  queries  [   all   │  none   ]  itm [   all   │  all    ]  itg [   all   │  none   ]
             text     [  none   │ causal* ]      [   all   │  all    ]      [   all   │ causal  ]

    ``*`` ``text_attention="bidirectional"`` makes the ITC text block full: the text then reads as it
    did in a bidirectional stage-1 text tower. Padding keys (``attention_mask == 0``) are hidden in
    every mode.

    Args:
        mode: one of :data:`MODES`.
        num_queries: Q.
        attention_mask: ``(N, T)`` 1 for real text tokens, 0 for padding.
        text_attention: one of :data:`TEXT_ATTENTION`; only the ITC text block depends on it.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown QLLaMA mode {mode!r}; choose one of {MODES}")
    if text_attention not in TEXT_ATTENTION:
        raise ValueError(f"Unknown text_attention {text_attention!r}; choose one of {TEXT_ATTENTION}")
    batch, num_text = attention_mask.shape
    device = attention_mask.device
    q, length = num_queries, num_queries + num_text
    mask = torch.ones(length, length, dtype=torch.bool, device=device)
    if mode in ("itc", "itg"):
        mask[:q, q:] = False  # queries never read the text they are later compared with or generate
        if mode == "itc":
            mask[q:, :q] = False
        if mode == "itg" or text_attention == "causal":
            mask[q:, q:] = causal_mask(num_text, num_text, device)
    keys = torch.cat((attention_mask.new_ones(batch, q), attention_mask), dim=1).bool()
    return mask[None, None] & keys[:, None, None, :]


class CrossAttention(nn.Module):
    """Queries read the vision features: RMSNorm on both inputs, no RoPE, no mask (InternVL's
    ``LlamaCrossAttention``; its parameter names ``norm1``/``norm2``/``q_proj``... are kept).

    ``forward(queries (N, Q, D), vision (N, L, vision_dim)) → (N, Q, D)``, the residual branch.
    """

    def __init__(self, config: LanguageConfig, vision_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_backend = config.num_heads, config.head_dim, config.attn_backend
        width = config.num_heads * config.head_dim
        self.norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.norm2 = RMSNorm(vision_dim, config.norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(vision_dim, width, bias=False)
        self.v_proj = nn.Linear(vision_dim, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        batch, num_queries, _ = queries.shape
        vision = self.norm2(vision.to(queries.dtype))
        q = self.q_proj(self.norm1(queries)).view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(vision).view(batch, vision.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vision).view(batch, vision.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, backend=self.attn_backend)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_queries, -1))


class QLLaMABlock(Block):
    """A LLaMA :class:`~lit_internvl.components.language.Block` with, optionally, cross-attention
    between self-attention and the MLP, applied to the first ``num_queries`` positions only."""

    def __init__(self, config: LanguageConfig, vision_dim: int, cross_attention: bool) -> None:
        super().__init__(config)
        self.cross_attn = CrossAttention(config, vision_dim) if cross_attention else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        vision: torch.Tensor | None,
        num_queries: int,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, False, cache)
        # num_queries == 0: a decoding step past the cached queries, which read the image once (the reference skips
        # cross-attention the same way when the step holds fewer positions than queries: modeling_qllama.py L463-466).
        if self.cross_attn is not None and vision is not None and num_queries:
            queries, text = x[:, :num_queries], x[:, num_queries:]
            x = torch.cat((queries + self.cross_attn(queries, vision), text), dim=1)
        return x + self.mlp(self.post_attention_layernorm(x))


class QLLaMA(nn.Module):
    """Learnable queries + a LLaMA trunk with cross-attention to vision features in every
    ``cross_attention_every``-th block (blocks 0, k, 2k, ... as in InternVL), and an LM head for ITG.

    Built as ``QLLaMA(vision_dim, **options)`` so that a stage can supply the vision width.

    Args:
        vision_dim: width of the vision features the queries read.
        language: the trunk's :class:`LanguageConfig` or preset name — that of the text tower it is
            initialised from.
        num_queries: learnable query tokens (96 in InternVL).
        cross_attention_every: a block with cross-attention every this many blocks.
        text_attention: how text reads text in ITC mode (see :func:`qllama_mask`): ``"causal"`` as
            in InternVL, whose text tower was a causal LLaMA; ``"bidirectional"`` keeps the text
            embeddings of a bidirectional :class:`~lit_internvl.components.TextEncoder`.

    Its self-attention masks are dense per-mode tensors (:func:`qllama_mask`), so it runs on the
    ``sdpa`` and ``eager`` backends only and refuses the others when built.
    """

    attention_backends = ("sdpa", "eager")

    def __init__(
        self,
        vision_dim: int,
        language: LanguageConfig | LanguagePreset = "tiny",
        num_queries: int = 96,
        cross_attention_every: int = 2,
        text_attention: TextAttention = "causal",
    ) -> None:
        super().__init__()
        config = LanguageConfig.from_name(language) if isinstance(language, str) else language
        check_backend(self, config.attn_backend)
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        if cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be at least 1, got {cross_attention_every}")
        if text_attention not in TEXT_ATTENTION:
            raise ValueError(f"Unknown text_attention {text_attention!r}; choose one of {TEXT_ATTENTION}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_queries = num_queries
        self.text_attention = text_attention
        self.query_tokens = nn.Parameter(torch.empty(num_queries, config.hidden_size))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            QLLaMABlock(config, vision_dim, cross_attention=index % cross_attention_every == 0)
            for index in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zeros, as InternVL's ``query_tokens`` (internvl_g/.../modeling_internvl.py, InternVLModel.__init__):
        # the queries differ from the first cross-attention on, where each reads the image at its position.
        nn.init.zeros_(self.query_tokens)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)

    def forward(
        self,
        vision: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: Mode = "itc",
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass over ``[queries, text]``.

        Args:
            vision: ``(N, L, vision_dim)`` features the queries cross-attend to, or None (no
                cross-attention: e.g. text-only embedding, where ITC hides the queries anyway).
            input_ids: ``(N, T)`` text, or None for a queries-only pass (connector, image embedding).
            attention_mask: ``(N, T)`` 1 for real tokens; all ones when None.
            mode: ``"itc"``, ``"itm"`` or ``"itg"`` (see :func:`qllama_mask`); unused without text.
            cache: incremental ITG decoding. Empty, the pass runs as without it and keeps every layer's keys and
                values; holding ``past`` positions, ``input_ids`` are the next text tokens, each reading every
                cached position and the new ones before it (the prefix LM's text rows; no padding: the cached
                prompts have none), and the returned queries are empty ``(N, 0, D)``.

        Returns:
            query hidden states ``(N, Q, D)`` and text hidden states ``(N, T, D)`` (None without
            text), after the final norm.
        """
        past = 0 if cache is None else cache.length
        if past:
            return self._decode_step(vision, input_ids, cache)
        if vision is None and input_ids is None:
            raise ValueError("QLLaMA needs vision features, input_ids, or both")
        batch = (vision if input_ids is None else input_ids).shape[0]
        x = self.query_tokens.expand(batch, -1, -1)
        mask = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            x = torch.cat((x, self.embed_tokens(input_ids).to(x.dtype)), dim=1)
            mask = qllama_mask(mode, self.num_queries, attention_mask, self.text_attention)
        positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32).expand(batch, -1)
        rope = self.rotary(positions)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, mask, vision, self.num_queries, None if cache is None else (cache, index))
        x = self.norm(x)
        queries, text = x[:, : self.num_queries], x[:, self.num_queries :]
        return queries, (text if input_ids is not None else None)

    def _decode_step(
        self, vision: torch.Tensor | None, input_ids: torch.Tensor | None, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New text tokens ``(N, T)`` after the ``past`` cached positions → (empty queries, text hidden ``(N, T, D)``)."""
        if input_ids is None:
            raise ValueError("a QLLaMA pass with a filled cache continues the text: input_ids are required")
        past, (batch, length) = cache.length, input_ids.shape
        x = self.embed_tokens(input_ids).to(self.query_tokens.dtype)
        # (1, 1, T, past + T): every cached position, then causal among the new tokens
        mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)[None, None]
        positions = torch.arange(past, past + length, device=x.device, dtype=torch.float32).expand(batch, -1)
        rope = self.rotary(positions)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, mask, vision, 0, (cache, index))
        return x[:, :0], self.norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` → logits ``(..., vocab_size)`` (tied to ``embed_tokens`` when the config says so)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def parameter_sets(self) -> dict[str, list[nn.Parameter]]:
        """``trunk`` (what a text tower provides), ``queries``, ``cross_attention`` (and ``lm_head``
        when untied): the sets a stage freezes or trains by name."""
        sets: dict[str, list[nn.Parameter]] = {"trunk": [], "queries": [self.query_tokens], "cross_attention": []}
        for name, param in self.named_parameters():
            if name == "query_tokens":
                continue
            if ".cross_attn." in name:
                sets["cross_attention"].append(param)
            elif name.startswith("lm_head."):
                sets.setdefault("lm_head", []).append(param)
            else:
                sets["trunk"].append(param)
        return sets


class QLLaMAConnector(nn.Module):
    """QLLaMA as the glue between a vision encoder and a decoder (InternVL-Chat with QLLaMA): the
    queries read the tile's features (queries-only pass) and a linear map takes them to the decoder.

    Connector contract: ``QLLaMAConnector(vision_dim, text_dim, **options)``;
    ``forward(features (N, 1+P, vision_dim)) → (N, num_queries, text_dim)``;
    ``tokens_per_tile(P) → num_queries``. ``options`` are :class:`QLLaMA`'s.
    """

    def __init__(self, vision_dim: int, text_dim: int, **options) -> None:
        super().__init__()
        self.qllama = QLLaMA(vision_dim, **options)
        self.proj = nn.Linear(self.qllama.hidden_size, text_dim)

    def tokens_per_tile(self, num_patches: int) -> int:
        return self.qllama.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries, _ = self.qllama(features)
        return self.proj(queries)


class InternVLG(nn.Module):
    """Stage-2 InternVL: the stage-1 dual encoder with QLLaMA as its text tower, plus a second image
    embedding read by the queries, an ITM head and the LM head of QLLaMA.

    ::

        pixel_values ─► vision ─► features ─┬─► image_projection (pools) ─► ‖·‖ ─► stage-1 image emb ─┐
                                            │                                                        (+) ─► ‖·‖ ─► G emb
                                            └─► QLLaMA queries ─► mean ─► query_projection ─► ‖·‖ ────┘
        input_ids ─► QLLaMA text (ITC mask) ─► pool ─► text_projection ─► ‖·‖ ─► text emb

    InternVL's choices are the defaults: the query outputs pooled by a second attention pool
    (``query_pooling="attention"``, the reference's ``clip_projector2``), the text embedding the last real
    token's state (``text_pooling="last"``: ``"summarize:" + caption`` and an end token, read causally).

    (G emb: the InternVL-G image embedding.)

    Names that stage 1 also has (``image_projection``, ``text_projection``, ``logit_scale``) are kept,
    so a stage-1 checkpoint loads with ``{"text_encoder.": "qllama."}``.

    Args:
        vision: image encoder ``(N, 3, H, W) → (N, 1+P, C)`` with ``hidden_size``.
        qllama: a :class:`QLLaMA` built for ``vision.hidden_size``.
        embed_dim: width of the shared embedding space.
        image_pooling: ``"cls"``, ``"mean"`` or ``"attention"`` — as in stage 1.
        text_pooling: ``"last"`` (InternVL) or ``"mean"`` — as the stage-1 text tower pooled.
        query_pooling: ``"attention"`` (InternVL's ``clip_projector2``) or ``"mean"`` of the query outputs.
        attn_pool_heads: heads of both attention pools (16 in InternVL).
    """

    def __init__(
        self,
        vision: nn.Module,
        qllama: QLLaMA,
        embed_dim: int = 128,
        image_pooling: ImagePooling = "attention",
        text_pooling: TextPooling = "last",
        init_logit_scale: float = math.log(1 / 0.07),
        query_pooling: QueryPooling = "attention",
        attn_pool_heads: int = 16,
    ) -> None:
        super().__init__()
        if text_pooling not in get_args(TextPooling):
            raise ValueError(f"Unknown text_pooling {text_pooling!r}; choose one of {get_args(TextPooling)}")
        if query_pooling not in get_args(QueryPooling):
            raise ValueError(f"Unknown query_pooling {query_pooling!r}; choose one of {get_args(QueryPooling)}")
        self.vision = vision
        self.qllama = qllama
        self.text_pooling = text_pooling
        self.image_projection = image_projection(vision.hidden_size, embed_dim, image_pooling, attn_pool_heads)
        self.text_projection = nn.Linear(qllama.hidden_size, embed_dim, bias=False)
        if query_pooling == "attention":
            self.query_projection = AttentionPool(qllama.hidden_size, embed_dim, attn_pool_heads)
        else:
            self.query_projection = nn.Linear(qllama.hidden_size, embed_dim, bias=False)
        self.itm_head = nn.Linear(qllama.hidden_size, 2)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def parameter_sets(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter sets for freezing: ``vision``, ``image_projection``, ``text_projection``,
        ``query_projection``, ``itm_head``, ``logit_scale`` and QLLaMA's (``trunk``, ``queries``,
        ``cross_attention``, ``lm_head`` when untied)."""
        sets = {
            name: list(getattr(self, name).parameters())
            for name in ("vision", "image_projection", "text_projection", "query_projection", "itm_head")
        }
        sets["logit_scale"] = [self.logit_scale]
        return sets | self.qllama.parameter_sets()

    def backbone_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features ``(N, 1+P, C)`` → the stage-1 image embedding ``(N, E)``, unit length."""
        return F.normalize(self.image_projection(features), dim=-1)

    def query_embedding(self, queries: torch.Tensor) -> torch.Tensor:
        """Query hidden states ``(N, Q, D)`` → pooled (attention pool, or mean and linear map) ``(N, E)``, unit length."""
        if isinstance(self.query_projection, AttentionPool):
            return F.normalize(self.query_projection(queries), dim=-1)
        return F.normalize(self.query_projection(queries.mean(dim=1)), dim=-1)

    def text_embedding(self, text: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text hidden states ``(N, T, D)`` → pooled and projected ``(N, E)``, unit length."""
        return F.normalize(self.text_projection(pool_text(text, attention_mask, self.text_pooling)), dim=-1)

    @staticmethod
    def ensemble(backbone_emb: torch.Tensor, query_emb: torch.Tensor) -> torch.Tensor:
        """InternVL-G's image embedding: the sum of the two unit embeddings, renormalised."""
        return F.normalize(backbone_emb + query_emb, dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, H, W)`` → (stage-1 embedding, InternVL-G embedding), each ``(N, E)``."""
        features = self.vision(pixel_values)
        backbone = self.backbone_embedding(features)
        queries, _ = self.qllama(features)
        return backbone, self.ensemble(backbone, self.query_embedding(queries))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T)`` → ``(N, E)`` unit text embeddings. Under the ITC mask the text never reads the
        queries, so no image is needed."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _, text = self.qllama(None, input_ids, attention_mask, mode="itc")
        return self.text_embedding(text, attention_mask)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        max_new_tokens: int = 30,
        eos_id: int | None = None,
        min_new_tokens: int = 0,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Captions by the ITG path, greedily: the queries read the image, the prompt (``"English caption:"``) and
        each new token read the queries and the text before them (the prefix LM of training), and the LM head picks
        the next token.

        InternVL-G captions this way (internvl_g/internvl/model/internvl_stage2/modeling_internvl.py L470-503,
        ``InternVLModel.generate``: queries prepended to the prompt's embeddings, ``use_zero_attention_mask`` for the
        queries' bidirectional block; internvl_g/eval/evaluate_caption.py L112, L151-160: the prompt
        ``"English caption:"`` with its BOS and no end token, ``do_sample=False``, ``max_new_tokens=30``,
        ``min_new_tokens=8``). The reference decodes with 5 beams by default; this is its ``--num-beams 1``.

        Args:
            pixel_values: ``(N, 3, H, W)``.
            input_ids: ``(N, P)`` the prompt, the same unpadded prefix on every row.
            max_new_tokens: tokens generated at most.
            eos_id: the end token: a row stops after it; None runs every row ``max_new_tokens`` long.
            min_new_tokens: the end token is not chosen before this many tokens (the reference's 8).
            use_cache: keep the keys and values of the queries and the text (:class:`KVCache`); without it every step
                re-runs the whole sequence, the reference the cache is tested against.

        Returns:
            each row's new tokens, up to and including ``eos_id``.
        """
        features = self.vision(pixel_values)
        batch = input_ids.shape[0]
        cache = KVCache(len(self.qllama.layers)) if use_cache else None
        new = input_ids.new_empty(batch, 0)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step = input_ids
        for count in range(max_new_tokens):
            if not use_cache:
                step = torch.cat((input_ids, new), dim=1)
            _, text = self.qllama(features, step, mode="itg", cache=cache)
            logits = self.qllama.head(text[:, -1]).float()  # (N, vocab)
            if eos_id is not None and count < min_new_tokens:
                logits[:, eos_id] = float("-inf")
            token = logits.argmax(dim=-1)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            new = torch.cat((new, token[:, None]), dim=1)
            step = token[:, None]
            if on_every_rank(bool(finished.all()), self, token.device):  # a sharded model's ranks stop together
                break
        rows = []
        for row in new.tolist():
            rows.append(row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row)
        return rows
