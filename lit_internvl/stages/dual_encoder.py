"""The base of the dual-encoder stages (InternVL-C, InternVL-G): a learnable temperature, zero-shot
classification, image↔text retrieval, and the validate/test dispatch they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lit_internvl.batch import PairBatch, Views
from lit_internvl.data.collate import pad_ids
from lit_internvl.data.views import View
from lit_internvl.distributed import unsharded
from lit_internvl.metrics import CrossModalRecall
from lit_internvl.stages.base import Stage


class DualEncoderStage(Stage, ABC):
    """Trains a model with ``encode_text`` and a ``logit_scale`` parameter (the inverse temperature,
    stored as its log), clamped to ``[0, max_logit_scale]`` after every step.

    Evaluation, shared: each validation/test batch gives one or more image embeddings (named by
    :attr:`embedding_names`) and a text embedding per pair (:meth:`evaluate_batch`); over an epoch
    every image embedding gets image↔text recall@1/5/10 (each distinct ``image_id`` once, any caption
    with the image's ``caption_key`` a hit) and, when the data names ``class_names``, zero-shot
    top-1/top-5 of the labelled images against the class embeddings (each class's prompts through the data's
    ``prompt_templates``, averaged as CLIP's prompt ensembles). One embedding logs as ``{split}/{metric}``,
    several as ``{split}/{name}/{metric}``; every metric's chance level is recorded.

    The vision encoder's position table is resized once to the data's tile size when the model is built
    (:meth:`~lit_internvl.stages.base.Stage.fit_vision_to_data`).
    """

    #: The image embeddings a batch is evaluated with.
    embedding_names: tuple[str, ...] = ("image",)

    def __init__(
        self,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        self.recall = nn.ModuleDict({name: CrossModalRecall(ks=(1, 5, 10)) for name in self.embedding_names})
        self.zero_shot: nn.ModuleDict | None = None
        self.class_embeddings: torch.Tensor | None = None

    views = (View("pair"),)

    def handshake(self, model: nn.Module) -> None:
        self.fit_vision_to_data(model.vision)
        self.ask_model_views(model)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.hparams.max_logit_scale)

    # -- evaluation ---------------------------------------------------------------------------

    @abstractmethod
    def evaluate_batch(self, batch: Views, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Log this batch's losses under ``split``; return the unit image embeddings by name and the
        unit text embeddings, each ``(N, E)``."""

    def class_name_embeddings(self) -> torch.Tensor | None:
        """Unit text embeddings ``(classes, E)`` of the data's ``class_names``: each class's prompts (its name in
        every one of the data's ``prompt_templates``, in the data's ITC text form ``text_ids``) embedded,
        averaged and renormalised (CLIP's zero-shot classifier); None when the data names no classes."""
        data = self.data
        names = getattr(data, "class_names", None)
        if not names:
            return None
        templates = list(getattr(data, "prompt_templates", None) or ["{}"])
        tokenizer = data.tokenizer
        encode = getattr(data, "text_ids", tokenizer.encode)
        prompts = [torch.tensor(encode(template.format(name))) for name in names for template in templates]
        ids, mask = pad_ids(prompts, tokenizer.pad_id)
        with unsharded(self.model):  # FSDP2 gathers parameters around forward only
            embeddings = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return F.normalize(embeddings.view(len(names), len(templates), -1).mean(dim=1), dim=-1)

    def _prepare_zero_shot(self) -> None:
        self.class_embeddings = self.class_name_embeddings()
        if self.class_embeddings is None:
            self.zero_shot = None
            return
        classes = self.class_embeddings.shape[0]
        if self.zero_shot is None or self.zero_shot.classes != classes:
            metrics = {}
            for name in self.embedding_names:
                metrics[f"{name}/top1"] = MulticlassAccuracy(num_classes=classes, average="micro")
                if classes > 5:
                    metrics[f"{name}/top5"] = MulticlassAccuracy(num_classes=classes, top_k=5, average="micro")
            self.zero_shot = nn.ModuleDict(metrics).to(self.device)
            self.zero_shot.classes = classes
        for metric in self.zero_shot.values():
            metric.reset()

    def _metric_name(self, split: str, embedding: str, metric: str) -> str:
        return f"{split}/{metric}" if len(self.embedding_names) == 1 else f"{split}/{embedding}/{metric}"

    def _evaluate(self, batch: Views, split: str) -> dict:
        images, text_emb = self.evaluate_batch(batch, split)
        pairs: PairBatch = batch["pair"]
        labels = pairs.label
        labelled = labels >= 0
        for name, image_emb in images.items():
            self.recall[name].update(image_emb, text_emb, pairs.caption_key, pairs.image_id)
            if self.zero_shot is not None and labelled.any():
                logits = image_emb[labelled] @ self.class_embeddings.T
                for metric in ("top1", "top5"):
                    if f"{name}/{metric}" in self.zero_shot:
                        self.zero_shot[f"{name}/{metric}"].update(logits, labels[labelled])
        # Returned to the callbacks' on_*_batch_end (the sample logger's nearest captions), not kept.
        return {"image_embeddings": images, "text_embeddings": text_emb}

    def _log_epoch(self, split: str) -> None:
        for name, recall in self.recall.items():
            for metric, value in recall.compute().items():
                self.log(self._metric_name(split, name, metric), value)
                self.chance_levels[self._metric_name(split, name, metric)] = recall.chance[metric]
            recall.reset()
            if self.zero_shot is None:
                continue
            for metric, k in (("top1", 1), ("top5", 5)):
                accuracy = self.zero_shot[f"{name}/{metric}"] if f"{name}/{metric}" in self.zero_shot else None
                if accuracy is None or not accuracy.update_called:
                    continue
                key = self._metric_name(split, name, f"zero_shot_{metric}")
                self.log(key, accuracy.compute())
                self.chance_levels[key] = k / self.zero_shot.classes
                accuracy.reset()

    def on_validation_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def validation_step(self, batch: Views, batch_idx: int) -> dict:
        """The batch's metrics; returns its unit embeddings (``image_embeddings`` by name, ``text_embeddings``)."""
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def test_step(self, batch: Views, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
