"""Stage 2 of InternVL: generative pretraining of QLLaMA (InternVL-G) with ITC + ITM + ITG."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lit_internvl.losses import contrastive_loss
from lit_internvl.metrics import CrossModalRecall
from lit_internvl.models.qllama import InternVLG, QLLaMA
from lit_internvl.stages.base import ModuleFactory, Stage, build

NEGATIVE_STRATEGIES = ("hard", "random")
# InternVL stage 2 trains only what is new: queries, cross-attention, the query projection, the ITM head
# and the temperature. The stage-1 embeddings (image and text) then stay exactly as stage 1 left them.
INTERNVL_FROZEN = ("vision", "image_projection", "trunk", "text_projection")


def sample_negatives(scores: torch.Tensor, allowed: torch.Tensor, strategy: str = "hard") -> torch.Tensor:
    """One negative per row for ITM, drawn among the ``allowed`` columns.

    ``"hard"`` draws column j with probability softmax(scores)[j] over the allowed columns (BLIP-2:
    the more similar a wrong partner, the likelier it is drawn); ``"random"`` draws uniformly.
    The softmax is taken over the allowed columns only, so the draw never lands elsewhere and the
    weights cannot all underflow to zero.

    Args:
        scores: ``(N, M)`` similarities of each row to each candidate.
        allowed: ``(N, M)`` boolean; False at the positive and at anything else that must not be
            called a mismatch (e.g. a caption that asserts the same thing).
        strategy: one of :data:`NEGATIVE_STRATEGIES`.

    Returns:
        ``(N,)`` column indices; -1 where a row has no allowed column.
    """
    if strategy not in NEGATIVE_STRATEGIES:
        raise ValueError(f"Unknown itm_negatives {strategy!r}; choose one of {NEGATIVE_STRATEGIES}")
    scores = scores.float() if strategy == "hard" else torch.zeros_like(scores, dtype=torch.float32)
    has_candidate = allowed.any(dim=1)
    # A row without candidates gets a dummy uniform row for the draw; its result is replaced by -1.
    allowed = allowed | ~has_candidate[:, None]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=1)
    drawn = torch.multinomial(weights, 1).squeeze(1)
    return torch.where(has_candidate, drawn, torch.full_like(drawn, -1))


def itm_pairs(negative_text: torch.Tensor, negative_image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (image, text) pairs ITM scores: one per sample, as InternVL budgets it (BLIP-2 scores 3N;
    one per sample costs a third and still has both kinds of negative).

    Row i keeps its positive pair when ``i % 4`` is 0 or 1, pairs image i with ``negative_text[i]``
    when it is 2, and ``negative_image[i]`` with text i when it is 3; a row whose negative is -1 (none
    allowed) is left out.

    Returns:
        image indices, text indices and labels (1 = match), each ``(M,)`` with M ≤ N.
    """
    rows = torch.arange(len(negative_text), device=negative_text.device)
    kind = rows % 4
    image_index = torch.where(kind == 3, negative_image, rows)
    text_index = torch.where(kind == 2, negative_text, rows)
    keep = (image_index >= 0) & (text_index >= 0)
    return image_index[keep], text_index[keep], (kind[keep] < 2).long()


class GenerativeStage(Stage):
    """Trains :class:`~lit_internvl.models.qllama.InternVLG` with ``itc_weight·ITC + itm_weight·ITM +
    itg_weight·ITG`` (1 each in InternVL), starting from a stage-1 checkpoint through ``init_from``.

    - ITC: the mean of the query outputs, projected, against the pooled text under the ITC mask, with
      the gathered contrastive loss of stage 1. Mean pooling (not BLIP-2's max over queries) because
      InternVL-G sums *one* query embedding with the stage-1 image embedding; InternVL's attention
      pooler uses that mean as its query.
    - ITM: a 2-way head over the mean query output of (image, text) pairs under the bidirectional
      mask; one pair per sample, half of them positive, the others pairing an image with a negative
      text or a text with a negative image, mined from this rank's ITC similarity
      (``itm_negatives="hard"``, BLIP-2) or uniformly (``"random"``); never the positive, nor a
      pair whose ``caption_key`` (when the batch has one) equals the positive's.
    - ITG: next-token cross-entropy on the text under the prefix-LM mask.

    ::

        pixel_values ─► vision ─► features ─┬─► QLLaMA itc ─► query emb ⟷ text emb ─► ITC
        input_ids ──────────────────────────┤                        │ similarity mines negatives
                                            ├─► QLLaMA itm (positives + negatives) ─► ITM head ─► ITM
                                            └─► QLLaMA itg ─► LM head ─► next-token loss ─► ITG

    Validation reports recall@1/5 of the stage-1 image embedding and of the InternVL-G embedding
    (stage-1 + query embedding), against the same text embeddings, and zero-shot top-1 of both
    when the datamodule has ``class_names``.

    Args:
        image_encoder: factory (YAML ``class_path``) or instance of the vision encoder.
        stage_options: :class:`Stage`'s optimiser (``learning_rate``, ``weight_decay``, ``betas``,
            ``warmup_steps``, ``min_lr_ratio``), ``init_from``/``init_from_rename`` and ``activation_checkpointing``.
        qllama: a :class:`QLLaMA` or a factory called with the vision width (YAML ``class_path`` of
            ``QLLaMA`` without ``vision_dim``).
        embed_dim, image_pooling: as in stage 1 (they must match the checkpoint).
        text_pooling: how the text tower pooled in stage 1: ``"mean"`` or ``"last"``.
        itm_negatives: ``"hard"`` or ``"random"``.
        frozen: named parameter sets (see :meth:`InternVLG.parameter_sets`) that do not train.
    """

    def __init__(
        self,
        image_encoder: ModuleFactory,
        qllama: Callable[[int], QLLaMA],
        embed_dim: int = 128,
        image_pooling: str = "cls",
        text_pooling: str = "mean",
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        itm_negatives: str = "hard",
        frozen: Sequence[str] = INTERNVL_FROZEN,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        if itm_negatives not in NEGATIVE_STRATEGIES:
            raise ValueError(f"Unknown itm_negatives {itm_negatives!r}; choose one of {NEGATIVE_STRATEGIES}")
        if not any((itc_weight, itm_weight, itg_weight)):
            raise ValueError("itc_weight, itm_weight and itg_weight are all 0: stage 2 would have no loss")
        self.save_hyperparameters(ignore=["image_encoder", "qllama"])
        self.image_encoder_factory = image_encoder
        self.qllama_factory = qllama
        self.recall = nn.ModuleDict({"stage1": CrossModalRecall(ks=(1, 5)), "internvl_g": CrossModalRecall(ks=(1, 5))})
        self.zero_shot: nn.ModuleDict | None = None
        self.class_embeddings: torch.Tensor | None = None

    def build_model(self) -> InternVLG:
        vision = build(self.image_encoder_factory)
        qllama = self.qllama_factory
        if not isinstance(qllama, nn.Module):
            qllama = qllama(vision.hidden_size)
        return InternVLG(
            vision, qllama, embed_dim=self.hparams.embed_dim, image_pooling=self.hparams.image_pooling,
            text_pooling=self.hparams.text_pooling, init_logit_scale=self.hparams.init_logit_scale,
        )  # fmt: skip

    def prepare_model(self, model: InternVLG) -> None:
        """Freezes the parameter sets named in ``frozen``."""
        sets = model.parameter_sets()
        unknown = sorted(set(self.hparams.frozen) - set(sets))
        if unknown:
            raise ValueError(f"frozen: unknown parameter set(s) {unknown}; known: {sorted(sets)}")
        for name in self.hparams.frozen:
            for param in sets[name]:
                param.requires_grad_(False)
        if "vision" in self.hparams.frozen:
            model.vision.eval()  # a frozen encoder gives its features without drop-path noise

    def train(self, mode: bool = True) -> GenerativeStage:
        """Keeps a frozen vision encoder in eval mode."""
        super().train(mode)
        if self.model is not None and "vision" in self.hparams.frozen:
            self.model.vision.eval()
        return self

    # -- the three losses ---------------------------------------------------------------------

    def _losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """→ ({"loss", "itc", "itm", "itg"} for the terms with a non-zero weight), and the vision
        features ``(N, 1+P, C)``, query and text embeddings ``(N, E)`` of the ITC pass."""
        model, weights = self.model, self.hparams
        ids, mask = batch["input_ids"], batch["attention_mask"]
        features = model.vision(batch["pixel_values"])
        queries, text = model.qllama(features, ids, mask, mode="itc")
        query_emb, text_emb = model.query_embedding(queries), model.text_embedding(text, mask)
        losses = {}
        if weights.itc_weight:
            losses["itc"] = contrastive_loss(query_emb, text_emb, model.logit_scale.exp())
        if weights.itm_weight:
            losses["itm"] = self._itm_loss(features, ids, mask, query_emb, text_emb, batch.get("caption_key"))
        if weights.itg_weight:
            _, text = model.qllama(features, ids, mask, mode="itg")
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # token t predicts token t+1
            logits = model.qllama.head(text[:, :-1])
            losses["itg"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        losses["loss"] = sum(getattr(weights, f"{name}_weight") * value for name, value in losses.items())
        return losses, (features, query_emb, text_emb)

    def _itm_loss(self, features, ids, mask, query_emb, text_emb, keys: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of the ITM head over the pairs of :func:`itm_pairs`, negatives mined from
        the ITC similarity of this rank's batch."""
        rows = torch.arange(ids.shape[0], device=ids.device)
        with torch.no_grad():
            similarity = query_emb @ text_emb.T  # (images, texts)
            allowed = rows[:, None] != rows[None, :]
            if keys is not None:
                allowed &= keys[:, None] != keys[None, :]
            negative_text = sample_negatives(similarity, allowed, self.hparams.itm_negatives)
            negative_image = sample_negatives(similarity.T, allowed.T, self.hparams.itm_negatives)
        image_index, text_index, labels = itm_pairs(negative_text, negative_image)
        queries, _ = self.model.qllama(features[image_index], ids[text_index], mask[text_index], mode="itm")
        return F.cross_entropy(self.model.itm_head(queries.mean(dim=1)).float(), labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, _ = self._losses(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss")
        self.log("train/logit_scale", self.model.logit_scale.exp().detach())
        return losses["loss"]

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
        if self.zero_shot is None or self.zero_shot["stage1"].num_classes != classes:
            self.zero_shot = nn.ModuleDict(
                {key: MulticlassAccuracy(num_classes=classes, average="micro") for key in self.recall}
            ).to(self.device)
        for metric in self.zero_shot.values():
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def on_test_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def _evaluate(self, batch: dict, split: str) -> None:
        losses, (features, query_emb, text_emb) = self._losses(batch)
        for name, value in losses.items():
            self.log(f"{split}/{name}", value, sync_dist=True)
        backbone = self.model.backbone_embedding(features)
        images = {"stage1": backbone, "internvl_g": self.model.ensemble(backbone, query_emb)}
        for key, image_emb in images.items():
            self.recall[key].update(image_emb, text_emb, batch["caption_key"])
            if self.zero_shot is not None:
                self.zero_shot[key].update(image_emb @ self.class_embeddings.T, batch["label"])

    def _log_epoch(self, split: str) -> None:
        for key, recall in self.recall.items():
            for name, value in recall.compute().items():
                self.log(f"{split}/{key}/{name}", value)
                self.chance_levels[f"{split}/{key}/{name}"] = recall.chance[name]
            recall.reset()
            if self.zero_shot is not None:
                self.log(f"{split}/{key}/zero_shot_top1", self.zero_shot[key].compute())
                self.chance_levels[f"{split}/{key}/zero_shot_top1"] = 1.0 / self.zero_shot[key].num_classes
                self.zero_shot[key].reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The stage-1 and InternVL-G image embeddings and the text embedding of each pair."""
        stage1, internvl_g = self.model.encode_image(batch["pixel_values"])
        text = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        return {"image_emb": stage1, "internvl_g_emb": internvl_g, "text_emb": text}
