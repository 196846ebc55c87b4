"""Stage 1 of InternVL: contrastive image–text pretraining (InternVL-C / CLIP)."""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import MulticlassAccuracy

from lit_internvl.distributed import unsharded
from lit_internvl.losses import contrastive_loss
from lit_internvl.metrics import CrossModalRecall
from lit_internvl.models.dual_encoder import DualEncoder
from lit_internvl.stages.base import ModuleFactory, Stage, build


class ContrastiveStage(Stage):
    """Trains a :class:`DualEncoder` with the symmetric contrastive loss over the global batch.

    The learnable logit scale starts at ``log(1/0.07)`` and is clamped to ``[0, log(100)]`` after
    every step. Validation reports zero-shot top-1 (when the datamodule has ``class_names``,
    ``prompt_template`` and ``tokenizer``) and image↔text recall@1/5.

    Args:
        image_encoder, text_encoder: factories (YAML ``class_path``) or instances of the towers.
        stage_options: :class:`Stage`'s optimiser (``learning_rate``, ``weight_decay``, ``betas``,
            ``warmup_steps``, ``min_lr_ratio``), ``init_from``/``init_from_rename`` and ``activation_checkpointing``.
        embed_dim: width of the shared embedding space.
        image_pooling: ``"cls"``, ``"mean"`` (of the patches) or ``"attention"`` (InternVL-C); see :class:`ImageProjection`.
    """

    def __init__(
        self,
        image_encoder: ModuleFactory,
        text_encoder: ModuleFactory,
        embed_dim: int = 128,
        image_pooling: str = "cls",
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        self.save_hyperparameters(ignore=["image_encoder", "text_encoder"])
        self.image_encoder_factory = image_encoder
        self.text_encoder_factory = text_encoder
        self.recall = CrossModalRecall(ks=(1, 5))
        self.zero_shot: MulticlassAccuracy | None = None
        self.class_embeddings: torch.Tensor | None = None

    def build_model(self) -> DualEncoder:
        return DualEncoder(
            build(self.image_encoder_factory),
            build(self.text_encoder_factory),
            embed_dim=self.hparams.embed_dim,
            image_pooling=self.hparams.image_pooling,
            init_logit_scale=self.hparams.init_logit_scale,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image_emb, text_emb, scale = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss = contrastive_loss(image_emb, text_emb, scale)
        batch_size = len(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", scale.detach(), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.hparams.max_logit_scale)

    # -- evaluation ---------------------------------------------------------------------------

    def _prepare_zero_shot(self) -> None:
        self.class_embeddings = self.class_name_embeddings()
        if self.class_embeddings is None:
            self.zero_shot = None
            return
        classes = self.class_embeddings.shape[0]
        if self.zero_shot is None or self.zero_shot.num_classes != classes:
            self.zero_shot = MulticlassAccuracy(num_classes=classes, average="micro").to(self.device)
        self.zero_shot.reset()

    def on_validation_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def on_test_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def _evaluate(self, batch: dict, split: str) -> None:
        image_emb, text_emb, scale = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        self.log(f"{split}/loss", contrastive_loss(image_emb, text_emb, scale), sync_dist=True, batch_size=len(image_emb))
        self.recall.update(image_emb, text_emb, batch["caption_key"])
        if self.zero_shot is not None:
            self.zero_shot.update(image_emb @ self.class_embeddings.T, batch["label"])

    def _log_epoch(self, split: str) -> None:
        recall = self.recall.compute()
        for name, value in recall.items():
            self.log(f"{split}/{name}", value)
        chance = {f"{split}/{name}": value for name, value in self.recall.chance.items()}
        self.recall.reset()
        if self.zero_shot is not None:
            self.log(f"{split}/zero_shot_top1", self.zero_shot.compute())
            chance[f"{split}/zero_shot_top1"] = 1.0 / self.zero_shot.num_classes
            self.zero_shot.reset()
        self.chance_levels.update(chance)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_predict_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Embeddings of each pair, and the zero-shot class of each image when classes are known."""
        with unsharded(self.model):
            image_emb = self.model.encode_image(batch["pixel_values"])
            out = {"image_emb": image_emb, "text_emb": self.model.encode_text(batch["input_ids"], batch["attention_mask"])}
        if self.zero_shot is not None:
            out["zero_shot_class"] = (image_emb @ self.class_embeddings.T).argmax(dim=-1)
        return out
