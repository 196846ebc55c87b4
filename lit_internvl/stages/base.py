"""The base every training stage shares: building modules lazily, the optimiser and its schedule,
and the end-of-fit metrics report."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn as nn

from lit_internvl.checkpoints import load_into
from lit_internvl.data.collate import pad_ids
from lit_internvl.distributed import data_parallel_mesh, parallelize, unsharded

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

    Optimiser: AdamW over :meth:`parameter_groups` with weight decay on matrices only (not on
    norms, biases, scales), a linear warm-up of ``warmup_steps`` and a cosine decay to
    ``min_lr_ratio`` × each group's learning rate.

    Scale: :meth:`configure_model` ends with :func:`lit_internvl.distributed.parallelize`: under
    ``ModelParallelStrategy`` every transformer block and then the root become FSDP2 units on the
    mesh's ``data_parallel`` dimension (gathered in bf16 when the trainer's precision is
    ``bf16-mixed``); ``activation_checkpointing`` recomputes each block's activations in the
    backward pass, with or without sharding. Subclasses freeze parts or add adapters in
    :meth:`prepare_model`, which runs before that.
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
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.activation_checkpointing = activation_checkpointing
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
        model = self.build_model()
        if self.init_from:
            load_into(model, self.init_from, self.init_from_rename)
        self.prepare_model(model)
        mesh = data_parallel_mesh(self.device_mesh)
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        param_dtype = torch.bfloat16 if mesh is not None and precision == "bf16-mixed" else None
        self.model = parallelize(model, mesh, self.activation_checkpointing, param_dtype)

    def class_name_embeddings(self) -> torch.Tensor | None:
        """Text embeddings ``(classes, E)`` of the datamodule's ``class_names`` in its ``prompt_template``, for
        zero-shot classification by a model with ``encode_text``; None when the datamodule names no classes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        if not names:
            return None
        tokenizer, template = datamodule.tokenizer, datamodule.prompt_template
        ids, mask = pad_ids([torch.tensor(tokenizer.encode(template.format(n))) for n in names], tokenizer.pad_id)
        with unsharded(self.model):  # FSDP2 gathers parameters around forward only
            return self.model.encode_text(ids.to(self.device), mask.to(self.device))

    def prepare_model(self, model: nn.Module) -> None:
        """Freeze parts or add adapters to the freshly built and loaded ``model`` (before sharding)."""

    def parameter_groups(self) -> list[dict]:
        """``[{"params": [...], "lr": ...}, ...]`` of the trainable parameters; stages with per-part
        learning rates override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": self.learning_rate}]

    def configure_optimizers(self):
        groups = []
        for group in self.parameter_groups():
            decay = [p for p in group["params"] if p.ndim >= 2]
            no_decay = [p for p in group["params"] if p.ndim < 2]
            groups += [
                {"params": params, "lr": group["lr"], "weight_decay": wd}
                for params, wd in ((decay, self.weight_decay), (no_decay, 0.0))
                if params
            ]
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas)
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

        from lit_internvl.callbacks.resume import ExactResume

        return [MetricsReport(), SkippedSamples(), ExactResume()]
