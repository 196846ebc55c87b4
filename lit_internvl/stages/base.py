"""The base every training stage shares: building modules lazily, the optimiser and its schedule,
and the end-of-fit metrics report."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn as nn

from lit_internvl.checkpoints import load_into

ModuleFactory = Callable[[], nn.Module]


def build(factory: ModuleFactory | nn.Module) -> nn.Module:
    """A module given as an instance (notebooks) or as a factory (YAML ``class_path``, ``functools.partial``)."""
    return factory if isinstance(factory, nn.Module) else factory()


class Stage(L.LightningModule):
    """Base LightningModule of every stage.

    Subclasses implement :meth:`build_model`; :meth:`configure_model` calls it once (so that FSDP can
    shard the network from the meta device), then loads ``init_from`` (a Lightning ``.ckpt`` of an
    earlier stage, a ``.safetensors`` file, or ``hf:/path``) by name after the prefix renames of
    ``init_from_rename``, reporting missing and unexpected keys. Subclasses report validation
    metrics under ``val/``; ``chance_levels`` holds the chance level of each such metric where one
    exists, for the end-of-fit report.

    Optimiser: AdamW with weight decay on matrices only (not on norms, biases, scales), a linear
    warm-up of ``warmup_steps`` and a cosine decay to ``min_lr_ratio × learning_rate``.
    """

    def __init__(
        self,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        init_from: str | None = None,
        init_from_rename: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.init_from = init_from
        self.init_from_rename = init_from_rename
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = betas
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.chance_levels: dict[str, float] = {}

    def build_model(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_model()
        if self.init_from:
            load_into(self.model, self.init_from, self.init_from_rename)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.learning_rate,
            betas=self.betas,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, floor = self.warmup_steps, self.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        from lit_internvl.callbacks.metrics_report import MetricsReport
        from lit_internvl.callbacks.skipped_samples import SkippedSamples

        return [MetricsReport(), SkippedSamples()]
