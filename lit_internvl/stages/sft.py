"""Supervised fine-tuning of the chat model (InternVL 1.5–3 stage 1.5 / 2): a VisionLanguageModel
trained on conversations, with freezing policies, LoRA and per-part learning rates."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from lit_internvl.batch import IGNORE_INDEX, Views
from lit_internvl.losses import language_model_loss, next_token_targets, reduce_token_losses
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.vision_language import VisionLanguageStage


class SFTStage(VisionLanguageStage):
    """Trains vision encoder → connector → decoder on next-token prediction of the answers
    (every option is :class:`VisionLanguageStage`'s).

    Validation logs ``val/loss`` and, when batches carry ``meta`` with an ``answer`` and a ``type``
    (the shapes world) and the data lists ``question_types``, exact-match accuracy per question
    type: a sample counts when every answer token (and the end token) is the model's argmax given
    the reference prefix, which is exactly when greedy decoding reproduces the answer.
    """

    def __init__(
        self, vision: ModuleFactory, connector: Callable[[int, int], nn.Module], decoder: ModuleFactory, **options
    ) -> None:
        super().__init__(vision, connector, decoder, **options)
        self.answer_accuracy = nn.ModuleDict()

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if batch.empty:  # every sample of the batch was a skipped bad record
            return None
        batch = batch["conversation"]
        losses = self.forward_batch(batch, cross_entropy=True)  # head + loss in chunks: no (N, vocab) logits
        h = self.hparams
        loss = reduce_token_losses(losses, batch.labels, batch.document_ids, h.loss_reduction, h.all_reduce_loss)
        aux = self.moe_aux_loss(batch.rows)  # a decoder with experts: its load-balancing loss
        if aux is not None:
            loss = loss + aux
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.rows)
        return loss

    # -- evaluation ---------------------------------------------------------------------------

    def setup_metrics(self) -> None:
        self.type_metrics(self.answer_accuracy, "answer_accuracy")

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        batch = batch["conversation"]
        logits = self.forward_batch(batch)
        loss = language_model_loss(logits, batch.labels, batch.document_ids, "token")
        self.log("val/loss", loss, sync_dist=True, batch_size=batch.rows)
        metas = batch.meta or []
        if not any(m and "type" in m for m in metas):
            return
        targets = next_token_targets(batch.labels, batch.document_ids)
        supervised = targets != IGNORE_INDEX
        wrong = torch.zeros_like(supervised)
        wrong[supervised] = logits.argmax(dim=-1) != targets[supervised]
        exact = ~wrong.any(dim=1)
        for row, meta in enumerate(metas):
            if meta and meta.get("type") in self.answer_accuracy:
                self.answer_accuracy[meta["type"]].update(exact[row].float())

    def on_validation_epoch_end(self) -> None:
        self.log_type_metrics(self.answer_accuracy, "answer_accuracy")
