"""Visual consistency learning (ViCO, InternVL3.5-Flash): the two stages that teach a model with a
:class:`~lit_internvl.components.FlashConnector` to answer from fewer visual tokens, and its router which tiles can.

- :class:`ViCOStage` (consistency): the policy sees each sample with its tiles at budgets drawn from the connector's
  two (256 or 64 a 448 px tile; 16 or 4 on the tiny tower at 112 px), the sequence shortened to match
  (:func:`~lit_internvl.models.routing.at_budgets`); a frozen reference, the policy as it started, always sees every
  tile at the first budget; the loss is the per-token ``KL(reference ‖ policy)`` over the answer's tokens, head and
  divergence computed in chunks (:func:`~lit_internvl.losses.linear_kl_divergence`).
- :class:`ViRStage` (router): everything frozen but the router; each tile is labelled by the ratio of the answer's
  loss with that tile compressed to its loss with none compressed, against a threshold that a sliding window of recent
  ratios keeps at a target compression rate; cross-entropy on the router's two-way head.

From the papers (InternVL3.5, arXiv 2508.18265, §2.3 "Visual Consistency Learning"; ViCO, arXiv 2510.12793): stage 1
minimises ``E_ξ [1/N Σ_i KL(π_ref(y_i | y_<i, I) ‖ π_θ(y_i | y_<i, I_ξ))]`` with ξ ∈ {1/4, 1/16} drawn at random, the
reference a frozen copy; stage 2 labels a patch 0 (compress) when ``r_i = L(y | I_1/16) / L(y | I_1/4) < τ``, 1
otherwise, τ adjusted on a sliding window of the r_i. No training code is public; where the papers leave a choice
open, the choice made here is the default named in the stage's arguments (and BENCHMARKS.md measures the result):

- ξ per sample (``draw: sample``: the formula's ``I_ξ`` is the image at one rate) or per tile (``draw: tile``);
- the loss of stage 2's ratio is the answer's cross-entropy (mean over its tokens) under the frozen model: the
  stage-1 KL of an uncompressed tile to a reference that is that same model would be 0, and a ratio over it undefined;
  ``ratio_eps`` (1 nat) is added to both losses: a ratio of two near-zero losses ranks noise (measured: the share of
  scenes that need detail among those labelled "compress" fell from 0.28 to 0.05 from ε = 1e-4 to 1);
- τ is the ``target_compression`` quantile of the last ``window`` ratios, so that that fraction of tiles is labelled
  "compress" whatever the losses' scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lit_internvl.batch import IGNORE_INDEX, Batch, Images, Views
from lit_internvl.components.router import COMPRESS
from lit_internvl.distributed import data_parallel_mesh, updated_on_any_rank, world
from lit_internvl.losses import (
    HEAD_CHUNK_SIZE,
    LossReduction,
    linear_kl_divergence,
    next_token_targets,
    reduce_token_losses,
    supervised_positions,
)
from lit_internvl.models.routing import at_budgets, route_batch
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.frozen import Frozen, eval_mode
from lit_internvl.stages.vision_language import Part, VisionLanguageStage

Draw = Literal["sample", "tile"]


@dataclass
class HiddenAt:
    """The final hidden states ``(N, D)`` at the N positions of ``at`` (a ``(B, T)`` bool mask), row-major."""

    at: torch.Tensor

    def __call__(self, decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[self.at]


@dataclass
class KLToReference:
    """``(N,)`` ``KL(reference ‖ policy)`` of the next-token distributions at the N positions of ``at``, the
    reference's given as its hidden states ``(N, D)`` and head ``(V, D)``: run inside the policy's forward, so that a
    sharded head is gathered (:func:`~lit_internvl.losses.linear_kl_divergence`)."""

    at: torch.Tensor
    reference_hidden: torch.Tensor
    reference_weight: torch.Tensor
    chunk_size: int = HEAD_CHUNK_SIZE

    def __call__(self, decoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return linear_kl_divergence(
            hidden[self.at], decoder.head_weight, self.reference_hidden, self.reference_weight, self.chunk_size
        )


def _full_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) weight gathered whole; a plain one as it is."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def exact_answers(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``(R,)`` bool: every supervised token of the row is the argmax of ``logits`` ``(N, V)`` (teacher forcing),
    which is exactly when greedy decoding reproduces the answer (:class:`~lit_internvl.stages.SFTStage`'s metric)."""
    targets = next_token_targets(batch.labels, batch.document_ids)
    supervised = targets != IGNORE_INDEX
    wrong = torch.zeros_like(supervised)
    wrong[supervised] = logits.argmax(dim=-1) != targets[supervised]
    return ~wrong.any(dim=1)


def visual_tokens(images: Images | None, rows: int) -> torch.Tensor:
    """``(R,)`` ``<IMG_CONTEXT>`` tokens each row's tiles take."""
    if images is None:
        return torch.zeros(rows)
    return torch.tensor(images.tokens_per_sample(), dtype=torch.float32, device=images.pixel_values.device)


class _FlashStage(VisionLanguageStage):
    """What the two ViCO stages share: a Flash connector, batches not routed on the way in (each stage sets the
    budgets it trains on), accuracy per question type logged under several names."""

    route_batches = False

    def check_flash(self, model: nn.Module) -> None:
        connector = model.connector
        if not hasattr(connector, "router") or len(model.budgets()) < 2:
            raise ValueError(
                f"{type(self).__name__} trains InternVL3.5-Flash's connector: model.init_args.connector must be "
                f"lit_internvl.components.FlashConnector, got {type(connector).__name__}"
            )

    def accuracy_metrics(self, names: tuple[str, ...]) -> None:
        for name in names:
            metrics = nn.ModuleDict()
            setattr(self, f"_{name}", metrics)
            self.type_metrics(metrics, name)

    def update_accuracy(self, name: str, exact: torch.Tensor, batch: Batch) -> None:
        metrics = getattr(self, f"_{name}", None)
        for row, meta in enumerate(batch.meta or []):
            if metrics is not None and meta and meta.get("type") in metrics:
                metrics[meta["type"]].update(exact[row].float())

    def exact(self, batch: Batch) -> torch.Tensor:
        return exact_answers(self.forward_batch(batch), batch)

    def at_second_budget(self, batch: Batch) -> Batch:
        """Every tile of ``batch`` at the connector's second (compressed) budget."""
        second = self.model.budgets()[1]
        images = Images(batch.images.pixel_values, batch.images.tiles_per_sample, [second] * len(batch.images.budgets))
        return at_budgets(batch, images, self.model.image_context_id)


class ViCOStage(_FlashStage):
    """ViCO stage 1, consistency: ``KL(reference at the first budget ‖ policy at drawn budgets)`` per answer token
    (module docstring). The reference is a frozen copy of the policy taken once ``init_from`` is loaded (the policy with
    its adapters off under LoRA); the router does not train here.

    Validation logs exact-match answer accuracy per question type with every tile at the first budget
    (``val/answer_accuracy_full``) and at the second (``val/answer_accuracy_compressed``), and ``val/kl`` with every
    tile compressed.

    Args (beyond :class:`~lit_internvl.stages.VisionLanguageStage`'s):
        compressed_probability: the chance that a sample (or a tile) is drawn at the second budget (the papers: ξ
            uniform over {1/4, 1/16}, 0.5).
        draw: one budget a sample (``sample``) or a budget a tile (``tile``).
        loss_reduction: over the answer tokens; ``sample`` is the formula's ``1/N Σ_i`` per sample.
        trainable: default the connector (the router excepted) and the decoder.
        seed: the draws are a function of (seed, optimiser step, rank), so that a resumed run draws what it would have.
    """

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        compressed_probability: float = 0.5,
        draw: Draw = "sample",
        loss_reduction: LossReduction = "sample",
        trainable: list[Part] = ["connector", "decoder"],  # noqa: B006 - jsonargparse needs a literal default
        seed: int = 0,
        **options,
    ) -> None:
        if not 0.0 <= compressed_probability <= 1.0:
            raise ValueError(f"model.init_args.compressed_probability must lie in [0, 1], got {compressed_probability}")
        if draw not in ("sample", "tile"):
            raise ValueError(f"model.init_args.draw must be 'sample' or 'tile', got {draw!r}")
        super().__init__(vision, connector, decoder, loss_reduction=loss_reduction, trainable=trainable, **options)
        self.reference: Frozen | None = None

    def setup_metrics(self) -> None:
        self.accuracy_metrics(("answer_accuracy_full", "answer_accuracy_compressed"))
        self.kl_metric = MeanMetric()

    def prepare_model(self, model: nn.Module) -> None:
        self.check_flash(model)
        super().prepare_model(model)
        model.connector.router.requires_grad_(False)  # ViCO's second stage trains it
        if self.hparams.lora:
            self.reference = Frozen.adapters_off(lambda: self.model)
        else:
            self.reference = Frozen.copy(model, self.parallelize)

    # -- the draw and the loss ----------------------------------------------------------------------------------

    def draw_budgets(self, images: Images, batch_idx: int = 0) -> list[int]:
        """Each tile's budget: the second with probability ``compressed_probability``, per sample or per tile; a
        function of the seed, the optimiser step, the rank and the micro-batch (``batch_idx``: the micro-batches
        accumulated into one step draw apart), so a resumed run draws the same."""
        h = self.hparams
        first, second = self.model.budgets()[:2]
        rank, world_size = world()
        step = (h.seed * 1_000_003 + self.global_step) * world_size + rank
        generator = torch.Generator().manual_seed(step * 1_000_003 + batch_idx)
        if h.draw == "tile":
            draws = torch.rand(len(images.budgets), generator=generator).tolist()
        else:
            per_sample = torch.rand(len(images.tiles_per_sample), generator=generator).tolist()
            draws = [d for d, tiles in zip(per_sample, images.tiles_per_sample) for _ in range(tiles)]
        return [second if d < h.compressed_probability else first for d in draws]

    def consistency(self, full: Batch, policy_batch: Batch) -> torch.Tensor:
        """``(N,)`` per-token ``KL(reference on full ‖ policy on policy_batch)`` at the answers' N positions."""
        with self.reference.use(self.device) as reference:
            at = supervised_positions(full.labels, full.document_ids)
            reference_hidden = self.forward_with(reference, full, HiddenAt(at))
            reference_weight = _full_tensor(reference.decoder.head_weight)
        head = KLToReference(
            supervised_positions(policy_batch.labels, policy_batch.document_ids), reference_hidden, reference_weight,
            self.speed.head_chunk_size,
        )  # fmt: skip
        return self.forward_with(self.model, policy_batch, head)

    def forward_with(self, model: nn.Module, batch: Batch, head) -> torch.Tensor:
        return model(
            batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
            document_ids=batch.document_ids, sample_names=batch.sample_names,
            length_multiple=self.speed.length_multiple, head=head,
        )  # fmt: skip

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if batch.empty:
            return None
        h, full = self.hparams, batch["conversation"]
        policy_batch = full
        if full.images is not None:
            budgets = self.draw_budgets(full.images, batch_idx)
            images = Images(full.images.pixel_values, full.images.tiles_per_sample, budgets)
            policy_batch = at_budgets(full, images, self.model.image_context_id)
        kl = self.consistency(full, policy_batch)
        loss = reduce_token_losses(kl, policy_batch.labels, policy_batch.document_ids, h.loss_reduction,
                                   h.all_reduce_loss)  # fmt: skip
        compressed = 0.0 if full.images is None else sum(b != self.model.budgets()[0] for b in budgets) / len(budgets)
        self.log_dict({"train/loss": loss, "train/kl": kl.mean().detach(), "train/compressed_tiles": compressed},
                      prog_bar=True, batch_size=full.rows)  # fmt: skip
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------------

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        full = batch["conversation"]
        self.update_accuracy("answer_accuracy_full", self.exact(full), full)
        if full.images is None:
            return
        small = self.at_second_budget(full)
        self.update_accuracy("answer_accuracy_compressed", self.exact(small), small)
        self.kl_metric.update(self.consistency(full, small))

    def on_validation_epoch_end(self) -> None:
        for name in ("answer_accuracy_full", "answer_accuracy_compressed"):
            self.log_type_metrics(getattr(self, f"_{name}"), name)
        if updated_on_any_rank(self.kl_metric):
            self.log("val/kl", self.kl_metric.compute())
        self.kl_metric.reset()


class ViRStage(_FlashStage):
    """ViCO stage 2, the router (ViR): only ``connector.router`` trains, on labels from the frozen model's losses
    (module docstring). A step runs the frozen model once with every tile at the first budget and once per tile with
    that tile alone compressed (the rows of one batch), in eval mode and without gradients, then the router.

    Validation routes the held-out batches with the released rule (the connector's thresholds) and logs the answer
    accuracy per question type (``val/answer_accuracy_routed``), the visual tokens a sample takes
    (``val/visual_tokens``) and the share of tiles compressed (``val/compressed_tiles``).

    Args (beyond :class:`~lit_internvl.stages.VisionLanguageStage`'s; ``trainable`` and ``lora`` do not apply):
        target_compression: the share of tiles labelled "compress" (the quantile of the window that τ is).
        window: how many recent ratios τ is computed from (gathered over the ranks).
        ratio_eps: added to both losses of a ratio (nats): answers nearly certain both ways (losses well under it)
            rank by their difference, not by a ratio of two near-zero numbers (BENCHMARKS.md measures the choice).
    """

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        target_compression: float = 0.5,
        window: int = 2048,
        ratio_eps: float = 1.0,
        **options,
    ) -> None:
        if not 0.0 < target_compression < 1.0:
            raise ValueError(f"model.init_args.target_compression must lie in (0, 1), got {target_compression}")
        if window < 1:
            raise ValueError(f"model.init_args.window must be positive, got {window}")
        if options.get("lora"):
            raise ValueError("model.init_args.lora: ViRStage trains the router alone; LoRA does not apply")
        super().__init__(vision, connector, decoder, **options)
        # The sliding window of ratios, in the checkpoint (exact resume): a ring of `window` values, `ratio_count` seen.
        self.register_buffer("ratio_window", torch.zeros(window))
        self.register_buffer("ratio_count", torch.zeros((), dtype=torch.long))
        self.tokens = MeanMetric()
        self.compressed = MeanMetric()

    def setup_metrics(self) -> None:
        self.accuracy_metrics(("answer_accuracy_routed",))

    def prepare_model(self, model: nn.Module) -> None:
        self.check_flash(model)
        if data_parallel_mesh(self.device_mesh) is not None:
            raise ValueError(
                "ViRStage trains the router on features outside the model's forward, where FSDP2 does not reduce its "
                "gradients: train it with DDP (the router is small; the frozen model is replicated)"
            )
        super().prepare_model(model)
        model.requires_grad_(False)
        model.connector.router.requires_grad_(True)

    # -- labels ---------------------------------------------------------------------------------------------------

    def tile_ratios(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (tiles, 1 + P, C), ratios (tiles,))``: each tile's ``(L_compressed + ε) / (L_full + ε)``, the
        losses the mean cross-entropy of its row's answer with that tile alone at the second budget, and with none."""
        model, eps = self.model, self.hparams.ratio_eps
        second = model.budgets()[1]
        images = batch.images
        with torch.no_grad(), eval_mode(model):
            features = model.vision(images.pixel_values)
            # Row r as it is, then one copy of row r for each of its tiles, that tile alone compressed.
            owner = [r for r, tiles in enumerate(images.tiles_per_sample) for _ in range(tiles)]
            with_features = Images(images.pixel_values, images.tiles_per_sample, images.budgets, features=features)
            variants = _select_rows(batch, list(range(batch.rows)) + owner, with_features)
            budgets, offset = list(variants.images.budgets), len(images.budgets)  # the copies' tiles follow
            row_start = [sum(images.tiles_per_sample[:r]) for r in range(batch.rows)]
            for tile, r in enumerate(owner):
                budgets[offset + tile - row_start[r]] = second
                offset += images.tiles_per_sample[r]
            shortened = at_budgets(variants, _with_budgets(variants.images, budgets), model.image_context_id)
            losses = self.forward_batch(shortened, cross_entropy=True)
            per_row = _row_means(losses, shortened.labels)
        full, compressed = per_row[: batch.rows], per_row[batch.rows :]
        ratios = (compressed + eps) / (full[torch.tensor(owner, device=full.device)] + eps)
        return features, ratios

    def threshold(self, ratios: torch.Tensor) -> torch.Tensor:
        """τ after adding ``ratios`` (every rank's) to the window: its ``target_compression`` quantile."""
        ratios = _gather(ratios.detach().float())
        size = self.ratio_window.numel()
        for value in ratios[-size:]:
            self.ratio_window[int(self.ratio_count) % size] = value
            self.ratio_count += 1
        seen = self.ratio_window[: min(int(self.ratio_count), size)]
        if not len(seen):  # no rank has had a tile yet
            return torch.tensor(float("nan"), device=seen.device)
        return torch.quantile(seen, self.hparams.target_compression)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if batch.empty or batch["conversation"].images is None:
            if world()[1] == 1:
                return None
            # Several processes: this rank still joins the gather of the ratios and the gradients' all-reduce.
            self.threshold(torch.zeros(0, device=self.device))
            return 0.0 * sum(p.sum() for p in self.model.connector.router.parameters())
        if batch["conversation"].document_ids is not None:
            raise ValueError("ViRStage labels each tile by its own sample's loss: set data.init_args.pack: false")
        features, ratios = self.tile_ratios(batch["conversation"])
        tau = self.threshold(ratios)
        labels = torch.where(ratios < tau, COMPRESS, 1 - COMPRESS)
        logits = self.model.connector.router(features.detach())
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/router_accuracy": accuracy, "train/tau": tau,
                       "train/ratio": ratios.mean(), "train/labelled_compress": (labels == COMPRESS).float().mean()},
                      prog_bar=True, batch_size=len(labels))  # fmt: skip
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------------

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        routed = route_batch(self.model, batch["conversation"])
        self.update_accuracy("answer_accuracy_routed", self.exact(routed), routed)
        self.tokens.update(visual_tokens(routed.images, routed.rows))
        if routed.images is not None:
            first = self.model.budgets()[0]
            self.compressed.update(torch.tensor([float(b != first) for b in routed.images.budgets]))

    def on_validation_epoch_end(self) -> None:
        self.log_type_metrics(self._answer_accuracy_routed, "answer_accuracy_routed")
        for name, metric in (("visual_tokens", self.tokens), ("compressed_tiles", self.compressed)):
            if updated_on_any_rank(metric):
                self.log(f"val/{name}", metric.compute())
            metric.reset()


def _gather(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``(n,)`` of every rank, concatenated in rank order (ranks may hold different counts)."""
    if world()[1] == 1:
        return values
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world()[1])]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = F.pad(values, (0, longest - values.numel()))
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(n)] for part, n in zip(gathered, sizes)])


def _row_means(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(R,)``: the mean of each row's ``(N,)`` per-token losses (row-major at the supervised positions)."""
    rows = supervised_positions(labels).nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], device=losses.device).index_add(0, rows, losses.float())
    count = torch.zeros(labels.shape[0], device=losses.device).index_add(0, rows, torch.ones_like(losses.float()))
    return total / count.clamp(min=1)


def _select_rows(batch: Batch, rows: list[int], images: Images) -> Batch:
    """The rows ``rows`` of an unpacked ``batch`` (repeats allowed), with their tiles (and features)."""
    index = torch.tensor(rows, device=batch.input_ids.device)
    return Batch(
        input_ids=batch.input_ids[index], labels=batch.labels[index], attention_mask=batch.attention_mask[index],
        positions=batch.positions[index], document_ids=None, images=images.select(rows),
        sample_names=[batch.sample_names[r] for r in rows],
    )  # fmt: skip


def _with_budgets(images: Images, budgets: list[int]) -> Images:
    return Images(images.pixel_values, images.tiles_per_sample, budgets, features=images.features)
