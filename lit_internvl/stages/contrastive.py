"""Stage 1 of InternVL: contrastive image–text pretraining (InternVL-C / CLIP)."""

from __future__ import annotations

import torch

from lit_internvl.batch import Views
from lit_internvl.distributed import unsharded
from lit_internvl.losses import contrastive_loss
from lit_internvl.models.dual_encoder import DualEncoder, ImagePooling
from lit_internvl.stages.base import ModuleFactory, build
from lit_internvl.stages.dual_encoder import DualEncoderStage


class ContrastiveStage(DualEncoderStage):
    """Trains a :class:`DualEncoder` with the symmetric contrastive loss over the global batch.

    The learnable logit scale starts at ``log(1/0.07)`` and is clamped to ``[0, log(100)]`` after
    every step. Validation reports zero-shot top-1 (when the data has ``class_names``) and
    image↔text recall@1/5 (:class:`DualEncoderStage`).

    Args:
        vision, text_encoder: factories (YAML ``class_path``) or instances of the towers.
        embed_dim: width of the shared embedding space.
        image_pooling: ``"attention"`` (InternVL-C's ``clip_projector``), ``"cls"`` or ``"mean"`` (of the patches);
            see :func:`~lit_internvl.models.dual_encoder.image_projection`.
        attn_pool_heads: heads of the attention pool (16 in InternVL-C).
        stage_options: :class:`DualEncoderStage`'s ``init_logit_scale``/``max_logit_scale`` and
            :class:`~lit_internvl.stages.base.Stage`'s optimiser, ``init_from`` and scale options.
    """

    factory_arguments = ("vision", "text_encoder")
    internvl1_kind = "c"

    def __init__(
        self,
        vision: ModuleFactory,
        text_encoder: ModuleFactory,
        embed_dim: int = 128,
        image_pooling: ImagePooling = "attention",
        attn_pool_heads: int = 16,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        self.factories = {"vision": vision, "text_encoder": text_encoder}

    def build_model(self) -> DualEncoder:
        h = self.hparams
        vision, text_encoder = build(self.factories["vision"]), build(self.factories["text_encoder"])
        return DualEncoder(vision, text_encoder, h.embed_dim, h.image_pooling, h.init_logit_scale, h.attn_pool_heads)

    def handshake(self, model: DualEncoder) -> None:
        self.check_vocabulary(model.text_encoder.embed_tokens, "model.init_args.text_encoder")
        super().handshake(model)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor:
        pairs = batch["pair"]
        image_emb, text_emb, scale = self.model(pairs.pixel_values, pairs.input_ids, pairs.attention_mask)
        loss = contrastive_loss(image_emb, text_emb, scale)
        batch_size = pairs.rows
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", scale.detach(), batch_size=batch_size)
        return loss

    def evaluate_batch(self, batch: Views, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pairs = batch["pair"]
        image_emb, text_emb, scale = self.model(pairs.pixel_values, pairs.input_ids, pairs.attention_mask)
        self.log(
            f"{split}/loss", contrastive_loss(image_emb, text_emb, scale), sync_dist=True, batch_size=len(image_emb)
        )
        return {"image": image_emb}, text_emb

    def on_predict_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def predict_step(self, batch: Views, batch_idx: int) -> dict:
        """Embeddings of each pair, and the zero-shot class of each image when classes are known."""
        pairs = batch["pair"]
        with unsharded(self.model):
            image_emb = self.model.encode_image(pairs.pixel_values)
            out = {"image_emb": image_emb, "text_emb": self.model.encode_text(pairs.input_ids, pairs.attention_mask)}
        if self.zero_shot is not None:
            out["zero_shot_class"] = (image_emb @ self.class_embeddings.T).argmax(dim=-1)
        return out
