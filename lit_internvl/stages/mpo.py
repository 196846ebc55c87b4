"""Mixed preference optimisation (InternVL 2.5-MPO / InternVL3): a chat model trained on pairs of a
chosen and a rejected answer to the same image and question."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics import MeanMetric

from lit_internvl.distributed import world
from lit_internvl.lora import lora_disabled
from lit_internvl.losses import (
    bco_pair_loss,
    dpo_sigmoid_loss,
    reduce_token_losses,
    row_log_probs,
    supervised_positions,
)
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.vision_language import VisionLanguageStage


@contextmanager
def _eval_mode(model: nn.Module):
    """Every submodule in eval mode inside the block (no dropout / drop-path in the reference pass),
    each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class MPOStage(VisionLanguageStage):
    """Mixed preference optimisation: ``w_p·DPO-sigmoid + w_q·BCO-pair + w_g·SFT``.

    Each term follows TRL's ``DPOTrainer`` (InternVL's MPO runs it with ``loss_type sigmoid,bco_pair``,
    ``loss_weights 0.8,0.2`` and ``rpo_alpha 1``): log-probabilities are summed over each response's
    supervised tokens; the reward of a response is ``β·(log π − log π_ref)``; the BCO term subtracts
    δ, the running mean of the batches' mean rewards (chosen and rejected together), updated with the
    current batch before use, averaged over ranks, and kept in the checkpoint (buffers ``bco_delta``,
    ``bco_count``); the SFT term is the language-model loss of the chosen answers (``loss_reduction``).

    The reference model is a frozen copy of the policy taken once ``init_from`` is loaded, held outside
    the module tree (not in checkpoints: it is rebuilt from ``init_from`` on resume, not trained, and
    not counted in ``parameters()``); with ``lora`` it is the policy itself with its adapters disabled,
    so no copy. Reference passes run in eval mode (no drop-path) without gradients.

    Batches are the :class:`~lit_internvl.data.collate.Collator`'s preference batches: the chosen
    sample's tensors plus ``batch["rejected"]`` (same images). Validation logs ``val/reward_accuracy``
    (chosen reward > rejected reward; chance 0.5), ``val/reward_margin`` and ``val/loss`` (the MPO loss,
    with δ as it stands).

    Args (beyond :class:`VisionLanguageStage`'s, which ``options`` passes on):
        beta: β of the DPO and BCO terms.
        preference_weight, quality_weight, generation_weight: w_p (DPO), w_q (BCO), w_g (SFT).
        learning_rate: MPO's smaller default (InternVL2.5-MPO's scripts: 5e-7).
    """

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        beta: float = 0.1,
        preference_weight: float = 0.8,
        quality_weight: float = 0.2,
        generation_weight: float = 1.0,
        learning_rate: float = 5e-7,
        **options,
    ) -> None:
        super().__init__(vision, connector, decoder, learning_rate=learning_rate, **options)
        # TRL's RunningMoments starts at mean 0, count 1e-24.
        self.register_buffer("bco_delta", torch.zeros(()))
        self.register_buffer("bco_count", torch.full((), 1e-24))
        self._reference: list[nn.Module] = []  # a list: kept out of the module tree (state dict, .train())
        self.reward_accuracy = MeanMetric()
        self.reward_margin = MeanMetric()

    # -- the reference model ------------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> None:
        """Runs after ``init_from`` is loaded and before sharding: copy the policy as the reference."""
        super().prepare_model(model)
        if self.hparams.lora:
            return
        self._reference = [self.parallelize(copy.deepcopy(model).requires_grad_(False).eval())]

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen copy (None under LoRA, where the reference is the adapter-disabled policy)."""
        if not self._reference:
            return None
        reference = self._reference[0]
        first = next(reference.parameters(), None)
        if first is not None and first.device != self.device and self.device_mesh is None:
            reference.to(self.device)
        return reference

    @torch.no_grad()
    def reference_logits(self, inputs: dict) -> torch.Tensor:
        """``(R, T, V)`` logits of the reference model."""
        with self._reference_pass() as reference:
            return self.forward_batch(inputs, reference, logits_at=False)

    @torch.no_grad()
    def reference_log_probs(self, inputs: dict) -> torch.Tensor:
        """``(R,)`` sequence log-probabilities of the reference model, the head and loss in chunks."""
        with self._reference_pass() as reference:
            return row_log_probs(self.forward_batch(inputs, reference, cross_entropy=True), inputs["labels"])

    @contextmanager
    def _reference_pass(self):
        if self.hparams.lora:
            with lora_disabled(self.model), _eval_mode(self.model):
                yield self.model
        else:
            yield self.reference_model

    # -- the loss -----------------------------------------------------------------------------

    @staticmethod
    def concatenated(batch: dict) -> dict:
        """Chosen rows then rejected rows in one right-padded batch (images repeated), as TRL's
        ``concatenated_forward``: one pass of the policy and one of the reference per step."""
        chosen, rejected = batch, batch["rejected"]
        width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

        def pad(key: str, value) -> torch.Tensor:
            out = []
            for part in (chosen, rejected):
                t = part[key]
                out.append(torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value))
            return torch.cat(out)

        pixels = batch["pixel_values"]
        return {
            "input_ids": pad("input_ids", 0),
            "labels": pad("labels", -100),
            "attention_mask": pad("attention_mask", 0),
            "positions": pad("positions", 0.0),
            "pixel_values": None if pixels is None else torch.cat([pixels, pixels]),
            "tiles_per_sample": list(batch["tiles_per_sample"]) * 2,
            "sample_names": list(batch["sample_names"]) + [f"{n}/rejected" for n in batch["sample_names"]],
        }

    def update_delta(self, rewards_mean: torch.Tensor) -> torch.Tensor:
        """TRL's ``RunningMoments.update`` of one batch's mean reward (over all ranks: the mean of the
        ranks' means, counting one per rank, as its ``get_global_statistics``); returns the new δ."""
        stats = torch.stack([rewards_mean.detach().float(), torch.ones((), device=rewards_mean.device)])
        if world()[1] > 1:
            dist.all_reduce(stats)
        batch_mean, batch_count = stats[0] / stats[1], stats[1]
        total = self.bco_count + batch_count
        self.bco_delta += (batch_mean - self.bco_delta) * batch_count / total
        self.bco_count.copy_(total)
        return self.bco_delta.clone()

    def preference_terms(self, batch: dict, update_delta: bool = True) -> dict[str, torch.Tensor]:
        h = self.hparams
        inputs = self.concatenated(batch)
        rows = batch["input_ids"].shape[0]
        labels = inputs["labels"]
        losses = self.forward_batch(inputs, cross_entropy=True)  # (N,), head + loss in chunks: no (N, vocab) logits
        logps, ref_logps = row_log_probs(losses, labels), self.reference_log_probs(inputs)
        chosen, rejected, ref_chosen, ref_rejected = logps[:rows], logps[rows:], ref_logps[:rows], ref_logps[rows:]
        chosen_rewards = (h.beta * (chosen - ref_chosen)).detach()
        rejected_rewards = (h.beta * (rejected - ref_rejected)).detach()
        if update_delta:
            delta = self.update_delta(torch.cat([chosen_rewards, rejected_rewards]).mean())
        else:
            delta = self.bco_delta.clone()
        dpo = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, h.beta).mean()
        bco = bco_pair_loss(chosen, rejected, ref_chosen, ref_rejected, h.beta, delta).mean()
        # The SFT term: the language-model loss of the chosen answers (the first `rows` rows, so the first entries).
        chosen_losses = losses[: int(supervised_positions(labels[:rows]).sum())]
        sft = reduce_token_losses(chosen_losses, labels[:rows], None, h.loss_reduction, h.all_reduce_loss)
        loss = h.preference_weight * dpo + h.quality_weight * bco + h.generation_weight * sft
        return {
            "loss": loss, "dpo": dpo, "bco": bco, "sft": sft, "delta": delta,
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "correct": chosen_rewards > rejected_rewards, "margins": chosen_rewards - rejected_rewards,
        }  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"] is None:
            return None
        if "rejected" not in batch:
            raise ValueError("MPOStage needs preference batches (records with 'chosen' and 'rejected')")
        terms = self.preference_terms(batch)
        size = batch["input_ids"].shape[0]
        for name in ("loss", "dpo", "bco", "sft", "reward_margin", "reward_accuracy", "delta"):
            self.log(f"train/{name}", terms[name], prog_bar=name == "loss", batch_size=size)
        return terms["loss"]

    # -- evaluation ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.chance_levels["val/reward_accuracy"] = 0.5

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"] is None:
            return
        terms = self.preference_terms(batch, update_delta=False)
        self.log("val/loss", terms["loss"], sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self.reward_accuracy.update(terms["correct"].float())
        self.reward_margin.update(terms["margins"])

    def on_validation_epoch_end(self) -> None:
        if self.reward_accuracy.update_count:
            self.log("val/reward_accuracy", self.reward_accuracy.compute())
            self.log("val/reward_margin", self.reward_margin.compute())
        self.reward_accuracy.reset()
        self.reward_margin.reset()
