"""Stage 2 of InternVL: generative pretraining of QLLaMA (InternVL-G) with ITC + ITM + ITG."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.batch import IGNORE_INDEX, PairBatch, Views
from lit_internvl.components.language import TextPooling
from lit_internvl.data.views import View
from lit_internvl.distributed import unsharded
from lit_internvl.losses import contrastive_loss
from lit_internvl.models.dual_encoder import ImagePooling
from lit_internvl.models.qllama import InternVLG, ParameterSet, QLLaMA, QueryPooling
from lit_internvl.stages.base import ModuleFactory, build
from lit_internvl.stages.dual_encoder import DualEncoderStage

NegativeStrategy = Literal["dataset", "hard", "random"]
NEGATIVE_STRATEGIES = get_args(NegativeStrategy)
# What ``predict`` writes: each pair's embeddings (returned), or a caption of each image by the ITG path
# (``predictions.jsonl``, for ``evaluate --metric caption``).
PredictOutput = Literal["embeddings", "captions"]
# InternVL stage 2 trains only what is new: queries, cross-attention, the query projection, the ITM head
# and the temperature. The stage-1 embeddings (image and text) then stay exactly as stage 1 left them.
INTERNVL_FROZEN = ("vision", "image_projection", "trunk", "text_projection")


def reference_itm_labels(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """ITM labels of InternVL's layout (``itm_negatives="dataset"``): the first ``B − ⌊B/2⌋`` images are paired
    with a caption of another image drawn from the whole dataset (label 0), the last ``⌊B/2⌋`` with their own
    caption (label 1); no negative images (internvl_g/internvl/model/internvl_stage2/modeling_internvl.py,
    ``InternVLModel.forward``: ``positive_num = batch_size // 2``, ``negative_input_ids[:-positive_num]``)."""
    positives = batch_size // 2
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    labels[batch_size - positives :] = 1
    return labels


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
    if strategy not in ("hard", "random"):
        raise ValueError(f"sample_negatives draws 'hard' or 'random' in-batch negatives, not {strategy!r}")
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

    InternVL's stage 2 (OpenGVLab/InternVL ``internvl_g/internvl/model/internvl_stage2/modeling_internvl.py``,
    ``InternVLModel.forward``, and ``internvl_g/internvl/train/dataset.py``) is the default; each text form
    comes from the data (:class:`~lit_internvl.data.pairs.CaptionForms`):

    - ITC: the query outputs pooled (``clip_projector2``) against the text's last-token state of
      ``"summarize:" + caption`` read causally (``input_ids``), with the gathered contrastive loss of stage 1.
    - ITM: a 2-way head over the mean query output of (image, caption) pairs under the bidirectional mask.
      ``itm_negatives="dataset"``: the first ``B − ⌊B/2⌋`` images with a caption of another image drawn
      from the whole dataset (``negative_ids``), the rest with their own (``itm_ids``)
      (:func:`reference_itm_labels`). ``"hard"`` (BLIP-2) or ``"random"``: one pair per sample, half
      positive, the others an image with a negative text or a text with a negative image from this rank's
      batch, hard ones drawn by ITC similarity (:func:`itm_pairs`); never a pair whose ``caption_key`` equals
      the positive's.
    - ITG: next-token cross-entropy under the prefix-LM mask on ``"English caption:" + caption``, every
      caption token supervised from the first (``itg_ids``, ``itg_labels``).

    ::

        pixel_values ─► vision ─► features ─┬─► QLLaMA itc ─► query emb ⟷ text emb ─► ITC
        input_ids ──────────────────────────┤
        itm_ids / negative_ids ─────────────┼─► QLLaMA itm (positives + negatives) ─► ITM head ─► ITM
        itg_ids ────────────────────────────┴─► QLLaMA itg ─► LM head ─► next-token loss ─► ITG

    Validation reports recall@1/5/10 of the stage-1 image embedding and of the InternVL-G embedding
    (stage-1 + query embedding), against the same text embeddings, and zero-shot top-1/top-5 of both
    when the data has ``class_names`` (:class:`DualEncoderStage`).

    Args:
        vision: factory (YAML ``class_path``) or instance of the vision encoder.
        qllama: a :class:`QLLaMA` or a factory called with the vision width (YAML ``class_path`` of
            ``QLLaMA`` without ``vision_dim``).
        embed_dim, image_pooling, attn_pool_heads: as in stage 1 (they must match the checkpoint).
        text_pooling: how the text embedding pools: ``"last"`` (InternVL) or ``"mean"`` (as a
            bidirectional stage-1 tower did).
        query_pooling: ``"attention"`` (InternVL's ``clip_projector2``) or ``"mean"``.
        itm_negatives: ``"dataset"`` (InternVL), ``"hard"`` or ``"random"``.
        frozen: named parameter sets (see :meth:`InternVLG.parameter_sets`) that do not train.
        predict_output: what ``predict`` gives: ``"embeddings"`` (returned) or ``"captions"``, each image captioned
            greedily by the ITG path (:meth:`InternVLG.generate`, the data's ITG prompt) and written with its
            caption as the reference to ``predictions.jsonl`` (``evaluate --metric caption`` scores them).
        caption_max_tokens, caption_min_tokens: the caption's length in tokens, at most and at least (InternVL's
            ``evaluate_caption.py``: 30 and 8 LLaMA tokens; a byte tokenizer needs more).
        stage_options: :class:`DualEncoderStage`'s ``init_logit_scale``/``max_logit_scale`` and
            :class:`~lit_internvl.stages.base.Stage`'s optimiser, ``init_from`` and scale options.
    """

    factory_arguments = ("vision", "qllama")
    embedding_names = ("stage1", "internvl_g")

    def __init__(
        self,
        vision: ModuleFactory,
        qllama: Callable[[int], QLLaMA],
        embed_dim: int = 128,
        image_pooling: ImagePooling = "attention",
        text_pooling: TextPooling = "last",
        query_pooling: QueryPooling = "attention",
        attn_pool_heads: int = 16,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        itm_negatives: NegativeStrategy = "dataset",
        frozen: Sequence[ParameterSet] = INTERNVL_FROZEN,
        predict_output: PredictOutput = "embeddings",
        caption_max_tokens: int = 30,
        caption_min_tokens: int = 8,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        if not any((itc_weight, itm_weight, itg_weight)):
            raise ValueError("itc_weight, itm_weight and itg_weight are all 0: stage 2 would have no loss")
        if itm_negatives not in NEGATIVE_STRATEGIES:
            raise ValueError(f"Unknown itm_negatives {itm_negatives!r}; choose one of {NEGATIVE_STRATEGIES}")
        if predict_output not in get_args(PredictOutput):
            raise ValueError(f"Unknown predict_output {predict_output!r}; choose one of {get_args(PredictOutput)}")
        if not 0 <= caption_min_tokens <= caption_max_tokens:
            raise ValueError(
                f"caption_min_tokens={caption_min_tokens} must lie in [0, caption_max_tokens={caption_max_tokens}]"
            )
        self.factories = {"vision": vision, "qllama": qllama}

    def build_model(self) -> InternVLG:
        h = self.hparams
        vision = build(self.factories["vision"])
        qllama = self.factories["qllama"]
        if not isinstance(qllama, nn.Module):
            qllama = qllama(vision.hidden_size)
        return InternVLG(
            vision, qllama, h.embed_dim, h.image_pooling, h.text_pooling, h.init_logit_scale, h.query_pooling,
            h.attn_pool_heads,
        )  # fmt: skip

    def handshake(self, model: InternVLG) -> None:
        self.check_vocabulary(model.qllama.embed_tokens, "model.init_args.qllama")
        super().handshake(model)

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

    @property
    def views(self) -> tuple[View, ...]:
        """The pairs, and ITM's negative captions when the data draws them (``itm_negatives: dataset``)."""
        dataset = self.hparams.itm_negatives == "dataset" and self.hparams.itm_weight
        return (View("pair"), View("negative")) if dataset else (View("pair"),)

    def _losses(self, views: Views) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """→ ({"loss", "itc", "itm", "itg"} for the terms with a non-zero weight), and the vision
        features ``(N, 1+P, C)``, query and text embeddings ``(N, E)`` of the ITC pass."""
        model, weights, batch = self.model, self.hparams, views["pair"]
        ids, mask = batch.input_ids, batch.attention_mask
        features = model.vision(batch.pixel_values)
        queries, text = model.qllama(features, ids, mask, mode="itc")
        query_emb, text_emb = model.query_embedding(queries), model.text_embedding(text, mask)
        losses = {}
        if weights.itc_weight:
            losses["itc"] = contrastive_loss(query_emb, text_emb, model.logit_scale.exp())
        if weights.itm_weight:
            losses["itm"] = self._itm_loss(features, views, query_emb, text_emb)
        if weights.itg_weight:
            _, text = model.qllama(features, batch.itg_ids, batch.itg_mask, mode="itg")
            targets = batch.itg_labels[:, 1:]  # token t predicts token t+1; the prefix is -100
            logits = model.qllama.head(text[:, :-1])
            losses["itg"] = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        losses["loss"] = sum(getattr(weights, f"{name}_weight") * value for name, value in losses.items())
        return losses, (features, query_emb, text_emb)

    def _itm_loss(self, features, views: Views, query_emb, text_emb) -> torch.Tensor:
        """Cross-entropy of the ITM head over the pairs the ``itm_negatives`` strategy makes."""
        batch = views["pair"]
        ids, mask = batch.itm_ids, batch.itm_mask
        if self.hparams.itm_negatives == "dataset":
            labels = reference_itm_labels(ids.shape[0], ids.device)
            negative_ids, negative_mask = views["negative"].input_ids, views["negative"].attention_mask
            length = max(ids.shape[1], negative_ids.shape[1])
            widen = lambda t: F.pad(t, (0, length - t.shape[1]))  # noqa: E731 - padded places are masked out
            negative = (labels == 0)[:, None]
            pair_ids = torch.where(negative, widen(negative_ids), widen(ids))
            pair_mask = torch.where(negative, widen(negative_mask), widen(mask))
            queries, _ = self.model.qllama(features, pair_ids, pair_mask, mode="itm")
            return F.cross_entropy(self.model.itm_head(queries.mean(dim=1)).float(), labels)
        rows = torch.arange(ids.shape[0], device=ids.device)
        keys = batch.caption_key
        with torch.no_grad():
            similarity = query_emb @ text_emb.T  # (images, texts)
            allowed = (rows[:, None] != rows[None, :]) & (keys[:, None] != keys[None, :])
            negative_text = sample_negatives(similarity, allowed, self.hparams.itm_negatives)
            negative_image = sample_negatives(similarity.T, allowed.T, self.hparams.itm_negatives)
        image_index, text_index, labels = itm_pairs(negative_text, negative_image)
        queries, _ = self.model.qllama(features[image_index], ids[text_index], mask[text_index], mode="itm")
        return F.cross_entropy(self.model.itm_head(queries.mean(dim=1)).float(), labels)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor:
        losses, _ = self._losses(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss")
        self.log("train/logit_scale", self.model.logit_scale.exp().detach())
        return losses["loss"]

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_batch(self, batch: Views, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        losses, (features, query_emb, text_emb) = self._losses(batch)
        for name, value in losses.items():
            self.log(f"{split}/{name}", value, sync_dist=True)
        backbone = self.model.backbone_embedding(features)
        return {"stage1": backbone, "internvl_g": self.model.ensemble(backbone, query_emb)}, text_emb

    def predict_step(self, batch: Views, batch_idx: int) -> dict | list[dict]:
        """The stage-1 and InternVL-G image embeddings and the text embedding of each pair; with
        ``predict_output="captions"``, each image's caption (:meth:`caption_rows`)."""
        pairs = batch["pair"]
        if self.hparams.predict_output == "captions":
            return self.caption_rows(pairs)
        stage1, internvl_g = self.model.encode_image(pairs.pixel_values)
        text = self.model.encode_text(pairs.input_ids, pairs.attention_mask)
        return {"image_emb": stage1, "internvl_g_emb": internvl_g, "text_emb": text}

    def caption_rows(self, pairs: PairBatch) -> list[dict]:
        """``{"name", "answer", "reference", "finished"}`` per pair: the caption generated from the image after the
        ITG prompt (the tokens of ``itg_ids`` before the first supervised one, e.g. ``"English caption:"``), and the
        pair's own caption as the reference (in its ITG form: normalised as the data trains it)."""
        tokenizer, h = self.data.tokenizer, self.hparams
        supervised = (pairs.itg_labels != IGNORE_INDEX).long()
        prefix = supervised.argmax(dim=1)  # the first supervised position: the prompt's length
        if not bool((prefix == prefix[0]).all()):
            raise ValueError(
                f"the ITG prompts of batch {pairs.sample_names[:3]}... differ in length: one prompt expected"
            )
        prompt = pairs.itg_ids[:, : int(prefix[0])]
        with unsharded(self.model):  # outside forward: FSDP2 gathers the root's parameters only around it
            captions = self.model.generate(
                pairs.pixel_values, prompt, h.caption_max_tokens, tokenizer.eos_id, h.caption_min_tokens
            )
        rows = []
        for name, tokens, labels in zip(pairs.sample_names, captions, pairs.itg_labels.tolist()):
            reference = [t for t in labels if t not in (IGNORE_INDEX, tokenizer.eos_id)]
            rows.append(
                {
                    "name": name,
                    "answer": tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True),
                    "finished": tokenizer.eos_id in tokens,
                }
            )
        return rows

    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if self.hparams.predict_output == "captions":
            from lit_internvl.callbacks.predictions import PredictionsWriter

            callbacks.append(PredictionsWriter())
        return callbacks
