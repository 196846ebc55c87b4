"""A process-reward critic (VisualPRM): a VisionLanguageModel trained to answer ``+`` or ``-`` after every step
of a solution (:mod:`lit_internvl.data.critic`), used to pick the best of N sampled answers
(:mod:`lit_internvl.inference.best_of_n`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
import torch.nn as nn
from torchmetrics import MeanMetric, SumMetric

from lit_internvl.batch import IGNORE_INDEX, Views
from lit_internvl.data.critic import GOOD, label_ids
from lit_internvl.distributed import updated_on_any_rank
from lit_internvl.inference.critic import Aggregate, aggregate, as_scored, step_probabilities
from lit_internvl.losses import language_model_loss, next_token_targets
from lit_internvl.stages.base import ModuleFactory
from lit_internvl.stages.sft import SFTStage


class CriticStage(SFTStage):
    """Trains the critic with :class:`SFTStage`'s training step, next-token prediction of the labelled tokens, which
    for steps records (:class:`~lit_internvl.data.samples.SampleBuilder`) are the ``+``/``-`` answers only: VisualPRM
    is a chat model fine-tuned on its conversations. It starts, as VisualPRM starts from InternVL2.5-8B, from a chat
    model: ``init_from`` an SFT run's ``.ckpt`` or ``hf:/folder``.

    The answers before a step are, by default, read as ``+`` in training as in scoring (``context: plus``,
    :func:`~lit_internvl.inference.critic.as_scored`): the critic must judge each step from the question, the image
    and the steps. VisualPRM trains on its conversations as written, the labels in the context (``context:
    labels``); there a step after a ``-`` is always ``-``, and a small critic learns to copy that instead of
    reading the steps (on the embedded default: validation accuracy above chance with the labels in view, every
    solution of a question scored alike with ``+`` in their place, which is what Best-of-N sees). A deliberate
    difference, selectable.

    Validation logs ``val/loss`` (in the training's context); ``val/step_accuracy``, whether P(``+``) > 0.5 agrees
    with each step's label (the answers read as ``+``, as scoring reads them), beside
    its chance level, the share of the more common label (answering it always); and ``val/ranking_accuracy``: over
    every question with a fully correct and a flawed solution in the validation data (samples sharing
    ``meta["group"]``), the share of (correct, flawed) pairs whose scores (``aggregate`` of the steps) put the
    correct one higher (ties count half; chance 0.5). The ranking is computed over each rank's own samples.

    Args (beyond :class:`~lit_internvl.stages.vision_language.VisionLanguageStage`'s, which ``options`` passes on):
        aggregate: how a solution's score is made of its steps' P(``+``): ``mean`` (VisualPRM), ``min``, ``last``.
        context: the answers the critic reads before each step in training: ``plus`` (as scored) or ``labels``.
    """

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        aggregate: Aggregate = "mean",
        context: Literal["plus", "labels"] = "plus",
        **options,
    ) -> None:
        if context not in ("plus", "labels"):
            raise ValueError(f"context must be 'plus' or 'labels', got {context!r}")
        super().__init__(vision, connector, decoder, **options)
        self.step_accuracy = MeanMetric()
        self.good_steps, self.steps = SumMetric(), SumMetric()
        self.ranking_accuracy = MeanMetric()
        self._solutions: dict[str, list[tuple[bool, float]]] = defaultdict(list)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor | None:
        if not batch.empty and self.hparams.context == "plus":
            plus = as_scored(batch["conversation"], label_ids(self.data.tokenizer)[0])
            batch = replace(batch, views={**batch.views, "conversation": plus})
        return super().training_step(batch, batch_idx)

    # -- evaluation ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.chance_levels["val/ranking_accuracy"] = 0.5

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if batch.empty:
            return
        batch = batch["conversation"]
        plus_id, minus_id = label_ids(self.data.tokenizer)
        logits = self.forward_batch(as_scored(batch, plus_id))  # what scoring sees
        trained = logits if self.hparams.context == "plus" else self.forward_batch(batch)
        loss = language_model_loss(trained, batch.labels, batch.document_ids, "token")
        self.log("val/loss", loss, sync_dist=True, batch_size=batch.rows)
        targets = next_token_targets(batch.labels, batch.document_ids)
        good = targets[targets != IGNORE_INDEX] == plus_id  # (N,) the labels, row-major as the logits
        scores = step_probabilities(logits, batch.labels, plus_id, minus_id)
        plus = torch.tensor([p for row in scores for p in row])
        self.step_accuracy.update(((plus > 0.5) == good.cpu()).float())
        self.good_steps.update(good.sum().float())
        self.steps.update(float(good.numel()))
        for meta, row in zip(batch.meta or [], scores):
            if meta and "group" in meta and "labels" in meta:
                correct = all(label == GOOD for label in meta["labels"])
                self._solutions[meta["group"]].append((correct, aggregate(row, self.hparams.aggregate)))

    def on_validation_epoch_end(self) -> None:
        if updated_on_any_rank(self.step_accuracy):
            share = (self.good_steps.compute() / self.steps.compute()).item()
            self.chance_levels["val/step_accuracy"] = max(share, 1 - share)
            self.log("val/step_accuracy", self.step_accuracy.compute())
        for solutions in self._solutions.values():
            for correct_score in (s for ok, s in solutions if ok):
                for flawed_score in (s for ok, s in solutions if not ok):
                    ordered = 0.5 if correct_score == flawed_score else float(correct_score > flawed_score)
                    self.ranking_accuracy.update(ordered)
        if updated_on_any_rank(self.ranking_accuracy):
            self.log("val/ranking_accuracy", self.ranking_accuracy.compute())
        for metric in (self.step_accuracy, self.good_steps, self.steps, self.ranking_accuracy):
            metric.reset()
        self._solutions.clear()
