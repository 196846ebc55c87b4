"""Mixture-of-experts feed-forward (Qwen3-MoE, GPT-OSS): a float32 softmax router, the top-k of E SwiGLU experts, and
the load-balancing auxiliary loss.

::

    x (N, H) ─► gate: logits = x·Wᵀ in float32 ─► softmax ─► top-k (weights renormalised: norm_topk_prob)
             └► experts: each token's k experts, SwiGLU each, summed by the weights ─► (N, H)

Parameter names are transformers 5's in-memory Qwen3-MoE ones (``modeling_qwen3_moe.py``, ``Qwen3MoeTopKRouter`` and
``Qwen3MoeExperts``): ``gate.weight (E, H)``, ``experts.gate_up_proj (E, 2I, H)`` (each expert's gate rows, then its
up rows) and ``experts.down_proj (E, H, I)``. Checkpoints store one matrix per expert
(``experts.N.gate_proj.weight``): :mod:`lit_internvl.hf.names` stacks and splits them.

How the experts run (``experts_backend``; all give the same numbers). The experts are stacked so that all of them run
as a few batched matrix products instead of a Python loop of small ones:

- ``"grouped_mm"``: the N·k (token, expert) pairs sorted by expert, one ``torch.nn.functional.grouped_mm`` per
  projection over the groups (offsets stay on the device: no host sync, no padding, only the routed rows are
  computed). What ``"auto"`` takes on CUDA in bfloat16, the dtype its kernels serve (transformers' ``grouped_mm``
  experts do the same, ``integrations/moe.py``).
- ``"padded"``: the sorted pairs scattered into an ``(E, C, H)`` buffer, C the most pairs any expert got, and one
  ``torch.bmm`` per projection; exact (no token is dropped), at the cost of computing the padding rows and of one
  host sync to read C. What ``"auto"`` takes elsewhere: on CPUs torch's grouped kernel needs 16-byte-aligned strides
  and its backward refuses broadcast gradients (torch 2.13), and transformers' other batched form, a gathered weight
  matrix per pair, holds N·k·2I·H numbers.
- ``"loop"``: one expert at a time over its tokens, as transformers' eager ``Qwen3MoeExperts.forward``: the reference
  the tests hold the others to.

The router runs in float32 with autocast off (its weight is upcast when the model computes in bfloat16; under FSDP2
:func:`~lit_internvl.distributed.parallelize` gathers it in float32), so that routing decisions do not flip with
rounding; transformers computes the logits in the model's dtype and only the softmax in float32, which is the same in
float32 and differs in bfloat16.

GPT-OSS (``style="gpt_oss"``; transformers' ``gpt_oss/modeling_gpt_oss.py``, ``GptOssTopKRouter`` and
``GptOssExperts``) differs in three places and shares the rest: the router has a bias and weighs the top-k by a
softmax over their logits (the same numbers as the softmax over all E renormalised over the top k, which is how
it is computed here); the experts have biases (``experts.gate_up_proj_bias (E, 2I)``, ``experts.down_proj_bias
(E, H)``); and their activation is the clamped SwiGLU ``(clamp(up, ±limit) + 1) · g·σ(α·g)``, ``g = min(gate,
limit)``, α = 1.702, with gate and up interleaved in the rows of ``gate_up_proj`` (row 2i gate, row 2i + 1 up, as
transformers' ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``). transformers keeps GPT-OSS's experts transposed
(``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)``) and names the router ``mlp.router``: the checkpoint mapping
transposes and renames, and the batched computation stays one for both styles.

Each :class:`SparseMoE` keeps the router logits of its last forward (``router_logits``, ``(N, E)`` float32) for
:func:`load_balancing_loss`, the auxiliary loss the training stages add with ``aux_loss_coef``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.sequence_parallel import SequenceParallel, group_sum

ExpertsBackend = Literal["auto", "grouped_mm", "padded", "loop"]
MoEStyle = Literal["qwen3", "gpt_oss"]


@dataclass
class MoEConfig:
    """The sparse MLP of a :class:`~lit_internvl.components.language.LanguageConfig` (transformers' ``Qwen3MoeConfig``
    fields in brackets).

    Args:
        num_experts: E, experts per sparse layer (``num_experts``).
        top_k: experts per token (``num_experts_per_tok``).
        intermediate_size: I, each expert's SwiGLU width (``moe_intermediate_size``); the dense layers keep the
            language config's ``intermediate_size``.
        norm_topk_prob: renormalise the k chosen probabilities to sum to 1 (``norm_topk_prob``).
        sparse_step: layer i is sparse when ``(i + 1) % sparse_step == 0`` (``decoder_sparse_step``)...
        mlp_only_layers: ...and i is not listed here (``mlp_only_layers``); the others keep the dense SwiGLU.
        aux_loss_coef: weight of the load-balancing loss in the training loss (``router_aux_loss_coef``); 0 turns it
            off.
        experts_backend: how the experts compute (module docstring); every choice gives the same numbers.
        style: ``"qwen3"``, or ``"gpt_oss"``: biases on the router and the experts, the clamped SwiGLU on interleaved
            gate/up rows (module docstring; transformers' ``GptOssConfig``).
        swiglu_limit: the clamp of GPT-OSS's SwiGLU (``swiglu_limit``).
        swiglu_alpha: the sigmoid gain of GPT-OSS's SwiGLU (``swiglu_alpha``).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = True
    sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    aux_loss_coef: float = 0.001
    experts_backend: ExpertsBackend = "auto"
    style: MoEStyle = "qwen3"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k {self.top_k} must be between 1 and moe.num_experts {self.num_experts}")
        if self.sparse_step < 1:
            raise ValueError(f"moe.sparse_step must be at least 1, got {self.sparse_step}")
        if self.experts_backend not in get_args(ExpertsBackend):
            raise ValueError(
                f"Unknown moe.experts_backend {self.experts_backend!r}; choose one of {get_args(ExpertsBackend)}"
            )
        if self.style not in get_args(MoEStyle):
            raise ValueError(f"Unknown moe.style {self.style!r}; choose one of {get_args(MoEStyle)}")
        if self.style == "gpt_oss" and not self.norm_topk_prob:
            raise ValueError("moe.style 'gpt_oss' weighs the top-k by a softmax over them: norm_topk_prob must be true")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has experts, as transformers' ``Qwen3MoeDecoderLayer`` decides."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.sparse_step == 0


class Router(nn.Module):
    """``weight (E, H)`` (and ``bias (E,)`` for GPT-OSS): token → E logits in float32, its top-k experts and their
    weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # transformers' initializer_range
        if self.bias is not None:
            nn.init.normal_(self.bias, std=0.02)  # as GptOssPreTrainedModel._init_weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (N, H)`` → logits ``(N, E)`` and top-k weights ``(N, k)``, both float32, and expert ids ``(N, k)``."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts


class Experts(nn.Module):
    """E SwiGLU experts stacked: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``; for ``style="gpt_oss"`` also
    ``gate_up_proj_bias (E, 2I)`` and ``down_proj_bias (E, H)``, gate and up rows interleaved, the clamped SwiGLU.

    ``forward(x (N, H), experts (N, k), weights (N, k)) → (N, H)``: ``Σ_j weights[n, j] · expert_{experts[n, j]}(x[n])``
    computed by ``backend`` (module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        backend: ExpertsBackend = "auto",
        style: MoEStyle = "qwen3",
        swiglu_limit: float = 7.0,
        swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        self.num_experts, self.backend = num_experts, backend
        self.style, self.swiglu_limit, self.swiglu_alpha = style, swiglu_limit, swiglu_alpha
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        biased = style == "gpt_oss"
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if biased else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if biased else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert as nn.Linear initialises its own weight (uniform over ±1/√fan_in), so that a fresh MoE decoder
        # starts at the scale of the dense one.
        for weight in (self.gate_up_proj, self.down_proj):
            bound = weight.shape[-1] ** -0.5
            nn.init.uniform_(weight, -bound, bound)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)  # as GptOssPreTrainedModel._init_weights

    def _activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.style == "gpt_oss":
            return _clamped_swiglu(gate_up, self.swiglu_alpha, self.swiglu_limit)
        return _swiglu(gate_up)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        backend = self.backend if self.backend != "auto" else _auto_backend(x)
        if backend == "loop":
            return self._loop(x, experts, weights)
        dtype = _compute_dtype(x)  # what autocast would run a matmul in (grouped_mm is not autocast)
        routed = _Routing(experts, self.num_experts)
        pairs = x[routed.token].to(dtype)  # (S, H): the S = N·k (token, expert) pairs, sorted by expert
        if backend == "grouped_mm":
            out = self._grouped(pairs, routed, dtype)
        elif backend == "padded":
            out = self._padded(pairs, routed, dtype)
        else:
            raise ValueError(f"Unknown experts backend {backend!r}; choose one of {get_args(ExpertsBackend)}")
        return routed.combine(out, weights, x.dtype)

    def _grouped(self, pairs: torch.Tensor, routed: _Routing, dtype: torch.dtype) -> torch.Tensor:
        offsets = routed.counts.cumsum(0).to(torch.int32)
        gate_up = _grouped_mm(pairs, self.gate_up_proj.to(dtype).transpose(-2, -1), offsets)  # (S, 2I)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias.to(dtype)[routed.expert]
        out = _grouped_mm(self._activation(gate_up), self.down_proj.to(dtype).transpose(-2, -1), offsets)  # (S, H)
        return out if self.down_proj_bias is None else out + self.down_proj_bias.to(dtype)[routed.expert]

    def _padded(self, pairs: torch.Tensor, routed: _Routing, dtype: torch.dtype) -> torch.Tensor:
        capacity = int(routed.counts.max())  # the one host sync
        slot = (routed.expert, routed.rank)
        buffer = pairs.new_zeros(self.num_experts, capacity, pairs.shape[-1]).index_put(slot, pairs)  # (E, C, H)
        gate_up = torch.bmm(buffer, self.gate_up_proj.to(dtype).transpose(1, 2))  # (E, C, 2I)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias.to(dtype)[:, None]
        out = torch.bmm(self._activation(gate_up), self.down_proj.to(dtype).transpose(1, 2))[slot]  # (S, H)
        return out if self.down_proj_bias is None else out + self.down_proj_bias.to(dtype)[routed.expert]

    def _loop(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        for expert in range(self.num_experts):
            token, choice = torch.where(experts == expert)
            if token.numel() == 0:
                continue
            gate_up_bias, down_bias = (
                None if b is None else b[expert] for b in (self.gate_up_proj_bias, self.down_proj_bias)
            )
            hidden = self._activation(F.linear(x[token], self.gate_up_proj[expert], gate_up_bias))
            y = F.linear(hidden, self.down_proj[expert], down_bias)
            out.index_add_(0, token, y.float() * weights[token, choice, None])
        return out.to(x.dtype)


class _Routing:
    """The N·k (token, expert) pairs of a batch sorted by expert: the pair order, its token, its expert, its rank
    within the expert's group, and the tokens each expert got."""

    def __init__(self, experts: torch.Tensor, num_experts: int) -> None:
        self.top_k = experts.shape[-1]
        flat = experts.flatten()  # (S,) pair p = token p // k, its (p % k)-th choice
        self.order = flat.argsort(stable=True)
        self.token = self.order // self.top_k
        self.expert = flat[self.order]
        self.counts = torch.bincount(flat, minlength=num_experts)  # (E,)
        starts = self.counts.cumsum(0) - self.counts
        self.rank = torch.arange(flat.numel(), device=flat.device) - starts[self.expert]

    def combine(self, out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sorted expert outputs ``(S, H)`` → ``(N, H)``: back in pair order, weighted, summed over each token's k
        (a sum in float32 rather than an ``index_add_``, deterministic on GPUs)."""
        unsorted = out[self.order.argsort()].float() * weights.flatten()[:, None]
        return unsorted.view(-1, self.top_k, out.shape[-1]).sum(dim=1).to(dtype)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation (``GptOssExperts._apply_gate``) on interleaved ``[g_0, u_0, g_1, u_1, …]``."""
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped(a, b, offs=offsets)


def _auto_backend(x: torch.Tensor) -> ExpertsBackend:
    if x.is_cuda and grouped_mm_available() and _compute_dtype(x) == torch.bfloat16:
        return "grouped_mm" if torch.cuda.get_device_capability(x.device) >= (8, 0) else "padded"
    return "padded"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class SparseMoE(nn.Module):
    """The mixture-of-experts MLP of a decoder block: ``gate`` (:class:`Router`) and ``experts`` (:class:`Experts`).

    ``forward(x (B, T, H)) → (B, T, H)``; ``router_logits`` keeps the ``(B·T, E)`` float32 logits of the last forward.
    """

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k
        biased = config.style == "gpt_oss"
        self.gate = Router(hidden_size, config.num_experts, config.top_k, config.norm_topk_prob, bias=biased)
        self.experts = Experts(
            hidden_size, config.intermediate_size, config.num_experts, config.experts_backend,
            config.style, config.swiglu_limit, config.swiglu_alpha,
        )  # fmt: skip
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        self.router_logits, weights, experts = self.gate(flat)
        return self.experts(flat, experts, weights).view(shape)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    all_reduce: bool = False,
    sequence_parallel: SequenceParallel | None = None,
) -> torch.Tensor:
    """The Switch Transformer load-balancing loss over every MoE layer of a forward pass, as transformers'
    ``load_balancing_loss_func`` (``modeling_qwen3_moe.py``) computes it::

        E · Σ_e f_e · P_e,   f_e = share of the top-k choices that went to expert e,
                             P_e = mean router probability of expert e,

    both taken over the rows of all layers together (the masked-out positions left out). Only ``P`` carries a
    gradient. 1 when routing is uniform; it grows as the load concentrates.

    Args:
        router_logits: one ``(B·T, E)`` tensor per MoE layer (:attr:`SparseMoE.router_logits`).
        attention_mask: ``(B, T)``, nonzero where a position counts; None: all of them.
        all_reduce: take ``f`` and ``P`` over the global batch (all ranks), and return the rank's share times the world
            size, so that data-parallel gradient averaging gives the gradient of the global-batch loss (as
            :func:`~lit_internvl.losses.reduce_token_losses` does for the language-model loss); the ranks' mean of the
            returned values is the global loss.
        sequence_parallel: the rows were split over this group (the logits and ``attention_mask`` are this rank's
            slice): ``f`` and ``P`` are summed over the group first, so that every rank computes the whole rows' loss
            (:mod:`~lit_internvl.components.sequence_parallel`'s gradient convention).
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one MoE layer")
    device = router_logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    choices = torch.zeros(num_experts, device=device)  # Σ over rows of the top-k one-hots
    probs_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        row_weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        if row_weight.shape[0] != probs.shape[0]:
            raise ValueError(
                f"attention_mask covers {row_weight.shape[0]} positions, the router logits {probs.shape[0]}"
            )
        choices = choices.index_add(0, chosen.flatten(), row_weight.repeat_interleave(top_k))
        probs_sum = probs_sum + (probs * row_weight[:, None]).sum(dim=0)
        rows = rows + row_weight.sum()
    if sequence_parallel is not None:
        counts = torch.cat([choices, rows[None]])
        torch.distributed.all_reduce(counts, group=sequence_parallel.group)
        choices, rows = counts[:-1], counts[-1]
        probs_sum = group_sum(probs_sum, sequence_parallel)
    world = 1
    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        counts = torch.cat([choices, rows[None]])
        torch.distributed.all_reduce(counts)
        choices, rows = counts[:-1], counts[-1]
        # P's global mean is the ranks' sums over the global rows; each rank's gradient reaches only its own sum.
    return num_experts * (choices / rows * (probs_sum / rows)).sum() * world
