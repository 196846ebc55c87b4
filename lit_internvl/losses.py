"""Training losses, each readable in a minute."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.distributed import world


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over the global batch, in the local-loss form.

    Each rank scores its own rows against the columns of every rank, gathered *with* gradients, and
    its labels are offset by the rows of the ranks before it. With equal local batches the mean of the per-rank
    losses is the loss of the concatenated batch, and with data-parallel gradient averaging so are the
    gradients; ranks with fewer pairs (a skipped bad record) still score all the others' (padded for the
    gather, the padding dropped).

    Args:
        image_emb, text_emb: ``(N, E)`` L2-normalised embeddings of this rank's N pairs.
        logit_scale: the temperature's inverse, ``exp`` already applied.
    """
    rank, world_size = world()
    offset = 0
    if world_size > 1:
        # Ranks may hold different numbers of pairs (a bad record skipped on one of them): gather their sizes,
        # pad every rank's rows to the largest, gather with gradients, and keep the real rows only.
        local = torch.tensor([image_emb.shape[0]], device=image_emb.device)
        sizes = [torch.zeros_like(local) for _ in range(world_size)]
        dist.all_gather(sizes, local)
        sizes = [int(size) for size in sizes]
        widest = max(sizes)
        real = torch.cat([torch.arange(widest, device=image_emb.device) < size for size in sizes])
        pad = lambda emb: F.pad(emb, (0, 0, 0, widest - emb.shape[0]))  # noqa: E731
        all_image = torch.cat(dist_fn.all_gather(pad(image_emb)), dim=0)[real]
        all_text = torch.cat(dist_fn.all_gather(pad(text_emb)), dim=0)[real]
        offset = sum(sizes[:rank])
    else:
        all_image, all_text = image_emb, text_emb
    logits_per_image = logit_scale * image_emb @ all_text.T
    logits_per_text = logit_scale * text_emb @ all_image.T
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


LossReduction = Literal["token", "sample", "square"]
REDUCTIONS = get_args(LossReduction)


def next_token_targets(labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for the logits at each position: the next position's label; ignored at a row's end
    and where the next token starts another document of a packed row."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if document_ids is not None:
        crosses = document_ids[:, 1:] != document_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def supervised_positions(labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose next-token target is supervised (the logits a loss needs)."""
    return next_token_targets(labels, document_ids) != IGNORE_INDEX


def language_model_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    reduction: LossReduction = "square",
    all_reduce: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy of logits with InternVL's per-sample weighting (:func:`reduce_token_losses`).

    Args:
        logits: ``(B, T, V)`` at every position, or ``(N, V)`` at the N :func:`supervised_positions`
            only (row-major, as ``model(..., head=Logits(supervised_positions(labels, document_ids)))``);
        labels: ``(B, T)`` with -100 where not trained;
        document_ids: ``(B, T)`` for packed rows, else each row is one sample.
    """
    targets = next_token_targets(labels, document_ids)
    supervised = targets != IGNORE_INDEX
    losses = F.cross_entropy(_supervised_logits(logits, supervised).float(), targets[supervised], reduction="none")
    return reduce_token_losses(losses, labels, document_ids, reduction, all_reduce)


def reduce_token_losses(
    losses: torch.Tensor,
    labels: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    reduction: LossReduction = "square",
    all_reduce: bool = False,
) -> torch.Tensor:
    """InternVL's weighted mean of the per-token cross-entropies of packed batches.

    Each supervised token of a sample (a document of a packed row, or a whole row) with ``x``
    supervised tokens weighs ``1`` (``token``), ``1/x`` (``sample``) or ``1/√x`` (``square``, the
    InternVL 2.5/3 default); the loss is the weighted sum over the normalising sum of weights.
    With ``all_reduce`` the sum of weights is taken over all ranks (and the result multiplied by
    the world size, which data-parallel gradient averaging divides out), so every token of the
    global batch counts alike whatever rank it landed on.

    Args:
        losses: ``(N,)`` cross-entropies at the N :func:`supervised_positions`, row-major (from
            :func:`linear_cross_entropy`, ``model(..., head=CrossEntropy(targets))``, or the logits as in :func:`language_model_loss`);
        labels, document_ids: as :func:`language_model_loss`'s.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown loss reduction {reduction!r}; choose one of {REDUCTIONS}")
    supervised = supervised_positions(labels, document_ids)
    if losses.shape != (int(supervised.sum()),):
        raise ValueError(
            f"Got {tuple(losses.shape)} token losses but the labels supervise {int(supervised.sum())} positions"
        )
    if reduction == "token":
        weights = torch.ones_like(losses)
    else:
        # Documents are keyed by (row, id) so that ids may repeat across rows.
        ids = document_ids if document_ids is not None else torch.zeros_like(labels)
        keys = torch.arange(labels.shape[0], device=labels.device)[:, None] * (ids.max() + 2) + ids + 1
        _, inverse = torch.unique(keys, return_inverse=True)
        counts = torch.zeros(int(inverse.max()) + 1, device=labels.device).index_add_(
            0, inverse.flatten(), supervised.flatten().float()
        )
        per_token = counts[inverse][supervised]
        weights = 1.0 / (per_token if reduction == "sample" else per_token.sqrt())
    total_weight = weights.sum()
    scale = 1.0
    if all_reduce:
        rank, world_size = world()
        if world_size > 1:
            total_weight = total_weight.detach().clone()
            dist.all_reduce(total_weight)
            scale = world_size
    if total_weight.item() == 0:
        raise ValueError("The batch has no supervised token (every label is -100): nothing to learn from")
    return (losses * weights).sum() / total_weight * scale


def _supervised_logits(logits: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """``(N, V)``: the logits at the supervised positions, from all ``(B, T, V)`` or already those."""
    if logits.dim() == 3:
        return logits[supervised]
    if logits.shape[0] != int(supervised.sum()):
        raise ValueError(
            f"Got logits for {logits.shape[0]} positions but the labels supervise {int(supervised.sum())}: pass "
            "logits (B, T, V) for every position or (N, V) for exactly the supervised ones"
        )
    return logits


# -- the output head and its cross-entropy, in chunks ------------------------------------------------------------

HeadBackend = Literal["chunked", "liger", "cce"]
HEAD_BACKENDS = get_args(HeadBackend)
HEAD_CHUNK_SIZE = 1024  # rows of logits a chunk: (1024, 151674) float32 is 0.6 GB, and a GEMM of 1024 rows is efficient


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = HEAD_CHUNK_SIZE,
    backend: HeadBackend = "chunked",
) -> torch.Tensor:
    """``(N,)`` float32 cross-entropies of ``hidden @ weight.T`` against ``targets``, without the ``(N, V)`` logits.

    The head and the loss are one computation over chunks of ``chunk_size`` rows: the forward keeps each row's
    log-sum-exp only, the backward recomputes each chunk's logits and turns them into gradients at once (softmax
    minus the one-hot target), so at most one chunk's logits exist at a time, in both directions. The matmuls run in
    the autocast dtype when autocast is on (as ``F.linear`` would), the softmax in float32. A target of -100 gives
    a loss of 0 and no gradient.

    Args:
        hidden: ``(N, D)`` final hidden states (e.g. at the supervised positions).
        weight: ``(V, D)`` the output head's weight (``Decoder.head_weight``).
        targets: ``(N,)`` token ids.
        chunk_size: rows a chunk.
        backend: ``chunked`` (this function), or the fused Triton kernels of ``liger`` (liger-kernel) or ``cce``
            (cut-cross-entropy) when installed (GPU only; the ``gpu`` extra does not pull them in).
    """
    if backend not in HEAD_BACKENDS:
        raise ValueError(f"Unknown head backend {backend!r}; choose one of {HEAD_BACKENDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        if backend == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none").float()
        if backend == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce

            return cce(hidden, weight, targets, reduction="none").float()
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """:func:`linear_cross_entropy`'s ``chunked`` backend: saves the inputs and each row's log-sum-exp only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        valid = targets != IGNORE_INDEX
        index = targets.clamp(min=0)[:, None]
        lse = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        picked = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.T).float()  # (C, V), the only logits alive
            picked[rows] = logits.gather(1, index[rows]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)  # log-sum-exp in place: no second (C, V) buffer
            lse[rows] = logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(1)
        ctx.save_for_backward(hidden, weight, index, valid, lse)
        ctx.chunk_size = chunk_size
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, index, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_losses.float(), 0.0)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # d loss / d logits = softmax − one-hot(target), times the upstream gradient of each row
            grad_logits = (hidden[rows] @ weight.T).float().sub_(lse[rows, None]).exp_()
            grad_logits.scatter_add_(1, index[rows], torch.full_like(index[rows], -1, dtype=torch.float32))
            grad_logits = grad_logits.mul_(scale[rows, None]).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight and grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(grad_logits.T, hidden[rows])  # accumulated in place: no (V, D) temporary
            elif need_weight:
                grad_weight += (grad_logits.T @ hidden[rows]).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


# -- preference optimisation (MPO: DPO-sigmoid + BCO-pair + SFT; TRL's formulas) ----------------


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the sum over each row's supervised tokens (labels != -100, next-token shifted) of
    the log-probability the logits ``(B, T, V)`` give them."""
    targets = next_token_targets(labels)
    supervised = targets != IGNORE_INDEX
    return row_log_probs(F.cross_entropy(logits[supervised].float(), targets[supervised], reduction="none"), labels)


def row_log_probs(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: minus the sum over each row of the ``(N,)`` cross-entropies at its supervised positions (row-major,
    as ``model(..., head=CrossEntropy(next_token_targets(labels)))`` gives them): each row's sequence log-probability."""
    rows = supervised_positions(labels).nonzero()[:, 0]
    return -torch.zeros(labels.shape[0], device=losses.device, dtype=losses.dtype).index_add(0, rows, losses)


def dpo_sigmoid_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per pair: ``-logsigmoid(β·((π_c − r_c) − (π_r − r_r)))`` (DPO, label smoothing 0)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def bco_pair_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    delta: torch.Tensor | float,
) -> torch.Tensor:
    """Per pair: ``-logsigmoid(β(π_c − r_c) − δ) − logsigmoid(−(β(π_r − r_r) − δ))``, δ the running
    mean of the rewards (TRL updates it with this batch's mean reward *before* using it)."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


# -- online RL: group-relative advantages, GRPO and GSPO (verl's verl/trainer/ppo/core_algos.py) --------------

PolicyLoss = Literal["grpo", "gspo"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """``(B, G)`` rewards of G answers to each of B prompts → advantages ``(r − mean_group) / (std_group + ε)``
    (``std`` unbiased, as ``torch.std``; ``scale=False``: Dr. GRPO's ``r − mean_group``). A group of one answer
    gets ``r`` (mean 0, std 1). As ``compute_grpo_outcome_advantage`` (core_algos.py L267-333)."""
    if rewards.shape[1] == 1:
        return rewards.clone()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


def _global_count(count: torch.Tensor, all_reduce: bool) -> tuple[torch.Tensor, int]:
    """``count`` summed over the ranks (and the world size, which data-parallel gradient averaging divides out)."""
    _, world_size = world()
    if not all_reduce or world_size == 1:
        return count, 1
    count = count.detach().clone()
    dist.all_reduce(count)
    return count, world_size


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: PolicyLoss = "gspo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_log_probs: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    max_log_ratio: float = 10.0,
    all_reduce: bool = False,
    count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss of N answers and its statistics.

    Args:
        log_probs, old_log_probs: ``(N, L)`` per-token log-probabilities of the answers under the policy being
            trained and under the policy that sampled them (π_old; no gradient).
        advantages: ``(N,)`` one per answer (:func:`group_advantages`), the same for each of its tokens.
        mask: ``(N, L)`` 1 on answer tokens.
        kind: ``"grpo"``: token ratio ``r_t = exp(clamp(log π − log π_old, ±20))``, loss
            ``max(−A·r_t, −A·clip(r_t, 1 − ε_low, 1 + ε_high))`` averaged over every answer token of the batch
            (verl's ``compute_policy_loss_vanilla`` L1160-1251, without its dual clip, and ``token-mean``), plus
            ``kl_weight`` × the k3 estimate ``exp(ref − log π) − (ref − log π) − 1`` of KL(π ‖ π_ref) per token.
            ``"gspo"``: the sequence ratio ``s = exp(mean_t(log π − log π_old))`` entering each token as
            ``sg[s] · π_t / sg[π_t]`` (its log clamped at ``max_log_ratio``), clipped as above, averaged over each
            answer's tokens and then over the answers (``seq-mean-token-mean``; ``compute_policy_loss_gspo``
            L1254-1326).
        all_reduce: normalise by the tokens (GRPO) or answers (GSPO) of all ranks, so that the ranks' mean
            gradient is the gradient of the loss over the combined rollouts.
        count: the answer tokens (GRPO) or answers (GSPO) to normalise by (default this batch's); a mini-batch of
            a rollout passes the whole rollout's, so that the mini-batches' gradients add up to the rollout's.

    Returns the loss and ``{"clip_fraction", "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "kl"}``
    (over this rank's answer tokens; ``kl`` is the k3 estimate to the reference, 0 without one).
    """
    mask = mask.to(log_probs.dtype)
    adv = advantages[:, None].to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    if kind == "grpo":
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    elif kind == "gspo":
        lengths = mask.sum(dim=1).clamp(min=1)
        sequence = (log_ratio * mask).sum(dim=1) / lengths
        ratio = torch.exp((log_probs - log_probs.detach() + sequence.detach()[:, None]).clamp(max=max_log_ratio))
    else:
        raise ValueError(f"Unknown policy loss {kind!r}; choose 'grpo' or 'gspo'")
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_log_probs is not None and kl_weight:
        delta = ref_log_probs - log_probs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_weight * kl
    lengths = mask.sum(dim=1)
    if count is None:
        count = mask.sum() if kind == "grpo" else (lengths > 0).to(mask.dtype).sum()
    count, scale = _global_count(torch.as_tensor(count, dtype=mask.dtype, device=mask.device), all_reduce)
    if kind == "grpo":
        loss = (per_token * mask).sum() / count.clamp(min=1) * scale
    else:
        loss = ((per_token * mask).sum(dim=1) / (lengths + 1e-8)).sum() / count.clamp(min=1) * scale
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        real = mask.bool()
        stats = {
            "clip_fraction": ((clipped > unclipped).to(mask.dtype) * mask).sum() / count,
            "ratio_mean": (ratio * mask).sum() / count,
            "ratio_min": ratio[real].min() if real.any() else ratio.new_ones(()),
            "ratio_max": ratio[real].max() if real.any() else ratio.new_ones(()),
            "approx_kl": (-log_ratio * mask).sum() / count,
            "kl": (kl * mask).sum() / count,
        }
    return loss, stats


# -- consistency: KL to a reference, head and loss in chunks (ViCO) ----------------------------------------------------


def linear_kl_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reference_hidden: torch.Tensor,
    reference_weight: torch.Tensor,
    chunk_size: int = HEAD_CHUNK_SIZE,
) -> torch.Tensor:
    """``(N,)`` float32 ``KL(q ‖ p)`` per row, ``q = softmax(reference_hidden @ reference_weight.T)`` (the reference's
    next-token distribution, no gradient) and ``p = softmax(hidden @ weight.T)`` (the policy's), without the ``(N, V)``
    distributions: as :func:`linear_cross_entropy`, the forward keeps each row's two log-sum-exps, and the backward
    recomputes a chunk of both distributions at a time (``d KL / d logits = p − q``). The reference's head may differ
    from the policy's (a frozen copy of a decoder that trains).

    Args:
        hidden: ``(N, D)`` the policy's final hidden states at the N positions compared.
        weight: ``(V, D)`` the policy's output head.
        reference_hidden: ``(N, D)`` the reference's at the same positions, in the same order.
        reference_weight: ``(V, D)`` the reference's output head.
        chunk_size: rows a chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] != reference_hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} policy positions but {reference_hidden.shape[0]} reference positions")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearKL.apply(
            hidden.to(dtype), weight.to(dtype), reference_hidden.detach().to(dtype),
            reference_weight.detach().to(dtype), chunk_size,
        )  # fmt: skip


class _ChunkedLinearKL(torch.autograd.Function):
    """:func:`linear_kl_divergence`: saves the inputs and each row's two log-sum-exps only."""

    @staticmethod
    def forward(ctx, hidden, weight, reference_hidden, reference_weight, chunk_size):
        rows_total = hidden.shape[0]
        lse = torch.empty(rows_total, device=hidden.device, dtype=torch.float32)
        reference_lse, kl = torch.empty_like(lse), torch.empty_like(lse)
        for start in range(0, rows_total, chunk_size):
            rows = slice(start, start + chunk_size)
            log_p = (hidden[rows] @ weight.T).float()
            log_q = (reference_hidden[rows] @ reference_weight.T).float()
            lse[rows] = torch.logsumexp(log_p, dim=-1)
            reference_lse[rows] = torch.logsumexp(log_q, dim=-1)
            log_p.sub_(lse[rows, None])
            log_q.sub_(reference_lse[rows, None])
            # Σ q (log q − log p), accumulated in place: log_p becomes log q − log p
            kl[rows] = (log_q.exp() * log_p.neg_().add_(log_q)).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, reference_hidden, reference_weight, lse, reference_lse)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, reference_hidden, reference_weight, lse, reference_lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            p = (hidden[rows] @ weight.T).float().sub_(lse[rows, None]).exp_()
            q = (reference_hidden[rows] @ reference_weight.T).float().sub_(reference_lse[rows, None]).exp_()
            grad_logits = p.sub_(q).mul_(grad_kl[rows, None].float()).to(hidden.dtype)  # (p − q) · upstream
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.T @ hidden[rows]).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None
