"""The base of the dual-encoder stages (InternVL-C, InternVL-G): a learnable temperature, zero-shot
classification, image↔text retrieval, and the validate/test dispatch they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from lit_internvl.data.collate import pad_ids
from lit_internvl.distributed import unsharded
from lit_internvl.metrics import CrossModalRecall
from lit_internvl.stages.base import Stage


class DualEncoderStage(Stage, ABC):
    """Trains a model with ``encode_text`` and a ``logit_scale`` parameter (the inverse temperature,
    stored as its log), clamped to ``[0, max_logit_scale]`` after every step.

    Evaluation, shared: each validation/test batch gives one or more image embeddings (named by
    :attr:`embedding_names`) and a text embedding per pair (:meth:`evaluate_batch`); over an epoch
    every image embedding gets image↔text recall@1/5 and, when the data names ``class_names``
    (through its ``prompt_template``), zero-shot top-1 against the class-name embeddings. One
    embedding logs as ``{split}/{metric}``, several as ``{split}/{name}/{metric}``; every metric's
    chance level is recorded.
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
        self.recall = nn.ModuleDict({name: CrossModalRecall(ks=(1, 5)) for name in self.embedding_names})
        self.zero_shot: nn.ModuleDict | None = None
        self.class_embeddings: torch.Tensor | None = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.hparams.max_logit_scale)

    # -- evaluation ---------------------------------------------------------------------------

    @abstractmethod
    def evaluate_batch(self, batch: dict, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Log this batch's losses under ``split``; return the unit image embeddings by name and the
        unit text embeddings, each ``(N, E)``."""

    def class_name_embeddings(self) -> torch.Tensor | None:
        """Text embeddings ``(classes, E)`` of the data's ``class_names`` in its ``prompt_template``;
        None when the data names no classes."""
        data = self.data
        names = getattr(data, "class_names", None)
        if not names:
            return None
        tokenizer, template = data.tokenizer, data.prompt_template
        ids, mask = pad_ids([torch.tensor(tokenizer.encode(template.format(n))) for n in names], tokenizer.pad_id)
        with unsharded(self.model):  # FSDP2 gathers parameters around forward only
            return self.model.encode_text(ids.to(self.device), mask.to(self.device))

    def _prepare_zero_shot(self) -> None:
        self.class_embeddings = self.class_name_embeddings()
        if self.class_embeddings is None:
            self.zero_shot = None
            return
        classes = self.class_embeddings.shape[0]
        if self.zero_shot is None or next(iter(self.zero_shot.values())).num_classes != classes:
            self.zero_shot = nn.ModuleDict(
                {name: MulticlassAccuracy(num_classes=classes, average="micro") for name in self.embedding_names}
            ).to(self.device)
        for metric in self.zero_shot.values():
            metric.reset()

    def _metric_name(self, split: str, embedding: str, metric: str) -> str:
        return f"{split}/{metric}" if len(self.embedding_names) == 1 else f"{split}/{embedding}/{metric}"

    def _evaluate(self, batch: dict, split: str) -> None:
        images, text_emb = self.evaluate_batch(batch, split)
        for name, image_emb in images.items():
            self.recall[name].update(image_emb, text_emb, batch["caption_key"])
            if self.zero_shot is not None:
                self.zero_shot[name].update(image_emb @ self.class_embeddings.T, batch["label"])

    def _log_epoch(self, split: str) -> None:
        for name, recall in self.recall.items():
            for metric, value in recall.compute().items():
                self.log(self._metric_name(split, name, metric), value)
                self.chance_levels[self._metric_name(split, name, metric)] = recall.chance[metric]
            recall.reset()
            if self.zero_shot is not None:
                key = self._metric_name(split, name, "zero_shot_top1")
                self.log(key, self.zero_shot[name].compute())
                self.chance_levels[key] = 1.0 / self.zero_shot[name].num_classes
                self.zero_shot[name].reset()

    def on_validation_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_zero_shot()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
