"""Stage 2 of InternVL: generative pretraining of QLLaMA (InternVL-G) with ITC + ITM + ITG."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.language import TextPooling
from lit_internvl.losses import contrastive_loss
from lit_internvl.models.dual_encoder import ImagePooling
from lit_internvl.models.qllama import InternVLG, ParameterSet, QLLaMA
from lit_internvl.stages.base import ModuleFactory, build
from lit_internvl.stages.dual_encoder import DualEncoderStage

NegativeStrategy = Literal["hard", "random"]
NEGATIVE_STRATEGIES = get_args(NegativeStrategy)
# InternVL stage 2 trains only what is new: queries, cross-attention, the query projection, the ITM head
# and the temperature. The stage-1 embeddings (image and text) then stay exactly as stage 1 left them.
INTERNVL_FROZEN = ("vision", "image_projection", "trunk", "text_projection")


def sample_negatives(scores: torch.Tensor, allowed: torch.Tensor, strategy: NegativeStrategy = "hard") -> torch.Tensor:
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


class GenerativeStage(DualEncoderStage):
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
    when the data has ``class_names`` (:class:`DualEncoderStage`).

    Args:
        vision: factory (YAML ``class_path``) or instance of the vision encoder.
        stage_options: :class:`DualEncoderStage`'s ``init_logit_scale``/``max_logit_scale`` and
            :class:`~lit_internvl.stages.base.Stage`'s optimiser, ``init_from`` and scale options.
        qllama: a :class:`QLLaMA` or a factory called with the vision width (YAML ``class_path`` of
            ``QLLaMA`` without ``vision_dim``).
        embed_dim, image_pooling: as in stage 1 (they must match the checkpoint).
        text_pooling: how the text tower pooled in stage 1: ``"mean"`` or ``"last"``.
        itm_negatives: ``"hard"`` or ``"random"``.
        frozen: named parameter sets (see :meth:`InternVLG.parameter_sets`) that do not train.
    """

    factory_arguments = ("vision", "qllama")
    embedding_names = ("stage1", "internvl_g")

    def __init__(
        self,
        vision: ModuleFactory,
        qllama: Callable[[int], QLLaMA],
        embed_dim: int = 128,
        image_pooling: ImagePooling = "cls",
        text_pooling: TextPooling = "mean",
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        itm_negatives: NegativeStrategy = "hard",
        frozen: Sequence[ParameterSet] = INTERNVL_FROZEN,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        if not any((itc_weight, itm_weight, itg_weight)):
            raise ValueError("itc_weight, itm_weight and itg_weight are all 0: stage 2 would have no loss")
        self.factories = {"vision": vision, "qllama": qllama}

    def build_model(self) -> InternVLG:
        h = self.hparams
        vision = build(self.factories["vision"])
        qllama = self.factories["qllama"]
        if not isinstance(qllama, nn.Module):
            qllama = qllama(vision.hidden_size)
        return InternVLG(vision, qllama, h.embed_dim, h.image_pooling, h.text_pooling, h.init_logit_scale)

    def handshake(self, model: InternVLG) -> None:
        self.check_vocabulary(model.qllama.embed_tokens, "model.init_args.qllama")

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

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_batch(self, batch: dict, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        losses, (features, query_emb, text_emb) = self._losses(batch)
        for name, value in losses.items():
            self.log(f"{split}/{name}", value, sync_dist=True)
        backbone = self.model.backbone_embedding(features)
        return {"stage1": backbone, "internvl_g": self.model.ensemble(backbone, query_emb)}, text_emb

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The stage-1 and InternVL-G image embeddings and the text embedding of each pair."""
        stage1, internvl_g = self.model.encode_image(batch["pixel_values"])
        text = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        return {"image_emb": stage1, "internvl_g_emb": internvl_g, "text_emb": text}
