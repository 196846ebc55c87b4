"""Mixed preference optimisation (InternVL 2.5-MPO / InternVL3): a chat model trained on pairs of a
chosen and a rejected answer to the same image and question."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lit_internvl.batch import IGNORE_INDEX, Batch, Images, Views
from lit_internvl.checkpoint_io import CheckpointError, fingerprint, fingerprint_differences
from lit_internvl.data.views import View
from lit_internvl.distributed import updated_on_any_rank, world
from lit_internvl.losses import (
    bco_pair_loss,
    dpo_sigmoid_loss,
    reduce_token_losses,
    row_log_probs,
    supervised_positions,
)
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.frozen import Frozen
from lit_internvl.stages.vision_language import VisionLanguageStage

REFERENCE_FINGERPRINT = "mpo_reference"  # the checkpoint's entry of the reference's fingerprint


class MPOStage(VisionLanguageStage):
    """Mixed preference optimisation: ``w_p·DPO-sigmoid + w_q·BCO-pair + w_g·SFT``.

    Each term follows TRL's ``DPOTrainer`` (InternVL's MPO runs it with ``loss_type sigmoid,bco_pair``,
    ``loss_weights 0.8,0.2`` and ``rpo_alpha 1``): log-probabilities are summed over each response's
    supervised tokens; the reward of a response is ``β·(log π − log π_ref)``; the BCO term subtracts
    δ, the running mean of the batches' mean rewards (chosen and rejected together), updated with the
    current batch before use, averaged over ranks, and kept in the checkpoint (buffers ``bco_delta``,
    ``bco_count``); the SFT term is the language-model loss of the chosen answers (``loss_reduction``).

    The reference model (:class:`~lit_internvl.stages.frozen.Frozen`) is a frozen copy of the policy taken once
    ``init_from`` is loaded (not in checkpoints: it is rebuilt from ``init_from`` on resume, and checked against the
    fingerprint of its weights the checkpoint keeps, so that a file replaced since cannot silently change it); with
    ``lora`` it is the policy itself with its adapters disabled, so no copy. Reference passes run in eval mode (no drop-path) without
    gradients.

    Its views are ``chosen`` and ``rejected``: the same question answered both ways, the same images. Validation logs ``val/reward_accuracy``
    (chosen reward > rejected reward; chance 0.5), ``val/reward_margin`` and ``val/loss`` (the MPO loss,
    with δ as it stands).

    Args (beyond :class:`VisionLanguageStage`'s, which ``options`` passes on):
        beta: β of the DPO and BCO terms.
        preference_weight, quality_weight, generation_weight: w_p (DPO), w_q (BCO), w_g (SFT).
        learning_rate: MPO's smaller default (InternVL2.5-MPO's scripts: 5e-7).
    """

    views = (View("chosen"), View("rejected"))

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
        self.reference: Frozen | None = None
        self.reference_fingerprint: dict | None = None
        self.reward_accuracy = MeanMetric()
        self.reward_margin = MeanMetric()

    # -- the reference model ------------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> None:
        """Runs after ``init_from`` is loaded and before sharding: the reference is a frozen copy of the policy, or
        the policy with its adapters off under LoRA."""
        super().prepare_model(model)
        if self.hparams.lora:
            self.reference = Frozen.adapters_off(lambda: self.model)
        else:
            self.reference_fingerprint = fingerprint(model)  # whole tensors: before sharding
            self.reference = Frozen.copy(model, self.parallelize)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_fingerprint is not None:
            checkpoint[REFERENCE_FINGERPRINT] = self.reference_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run's reference, rebuilt from ``init_from``, must be the one the run started with."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(REFERENCE_FINGERPRINT)
        if not saved or self.reference_fingerprint is None or self._trainer is None:
            return
        differ = fingerprint_differences(saved, self.reference_fingerprint)
        if differ and str(self.trainer.state.fn) in ("fit", "TrainerFn.FITTING"):
            raise CheckpointError(
                f"--ckpt_path {self.trainer.ckpt_path}: MPO's reference model is rebuilt from model.init_args.init_from "
                f"({self.hparams.init_from}) on resume, and it is not the model this run started from: {len(differ)} "
                f"of {len(saved)} tensors differ ({', '.join(differ[:3])}{', …' if len(differ) > 3 else ''}). The file "
                "has changed since the run started; give the one it started from."
            )

    @torch.no_grad()
    def reference_logits(self, inputs: Batch) -> torch.Tensor:
        """``(R, T, V)`` logits of the reference model."""
        with self.reference.use(self.device) as reference:
            return self.forward_batch(inputs, reference, logits_at=False)

    @torch.no_grad()
    def reference_log_probs(self, inputs: Batch) -> torch.Tensor:
        """``(R,)`` sequence log-probabilities of the reference model, the head and loss in chunks."""
        with self.reference.use(self.device) as reference:
            return row_log_probs(self.forward_batch(inputs, reference, cross_entropy=True), inputs.labels)

    # -- the loss -----------------------------------------------------------------------------

    @staticmethod
    def concatenated(batch: Views) -> Batch:
        """Chosen rows then rejected rows in one right-padded batch, as TRL's ``concatenated_forward``: one pass of
        the policy and one of the reference per step."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        width = max(chosen.input_ids.shape[1], rejected.input_ids.shape[1])

        def pad(key: str, value) -> torch.Tensor:
            parts = (getattr(chosen, key), getattr(rejected, key))
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in parts])

        images = None
        if chosen.images is not None:
            images = Images(
                torch.cat([chosen.images.pixel_values, rejected.images.pixel_values]),
                chosen.images.tiles_per_sample + rejected.images.tiles_per_sample,
                chosen.images.budgets + rejected.images.budgets,
            )
        return Batch(
            input_ids=pad("input_ids", 0), labels=pad("labels", IGNORE_INDEX), attention_mask=pad("attention_mask", 0),
            positions=pad("positions", 0.0), document_ids=None, images=images,
            sample_names=chosen.sample_names + [f"{n}/rejected" for n in rejected.sample_names],
        )  # fmt: skip

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

    def preference_terms(self, batch: Views, update_delta: bool = True) -> dict[str, torch.Tensor]:
        h = self.hparams
        inputs = self.concatenated(batch)
        rows = batch["chosen"].rows
        labels = inputs.labels
        losses = self.forward_batch(inputs, cross_entropy=True)  # (N,), head + loss in chunks: no (N, vocab) logits
        aux = self.moe_aux_loss(rows)  # before the reference pass, which under LoRA runs through the same decoder
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
        if aux is not None:  # a decoder with experts, training
            loss = loss + aux
        return {
            "loss": loss, "dpo": dpo, "bco": bco, "sft": sft, "delta": delta,
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "correct": chosen_rewards > rejected_rewards, "margins": chosen_rewards - rejected_rewards,
        }  # fmt: skip

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if batch.empty:  # every record of the batch was skipped
            return None
        terms = self.preference_terms(batch)
        size = batch["chosen"].rows
        for name in ("loss", "dpo", "bco", "sft", "reward_margin", "reward_accuracy", "delta"):
            self.log(f"train/{name}", terms[name], prog_bar=name == "loss", batch_size=size)
        return terms["loss"]

    # -- evaluation ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.chance_levels["val/reward_accuracy"] = 0.5

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        terms = self.preference_terms(batch, update_delta=False)
        self.log("val/loss", terms["loss"], sync_dist=True, batch_size=batch["chosen"].rows)
        self.reward_accuracy.update(terms["correct"].float())
        self.reward_margin.update(terms["margins"])

    def on_validation_epoch_end(self) -> None:
        if updated_on_any_rank(self.reward_accuracy):
            self.log("val/reward_accuracy", self.reward_accuracy.compute())
            self.log("val/reward_margin", self.reward_margin.compute())
        self.reward_accuracy.reset()
        self.reward_margin.reset()
