"""The base every training stage shares: building the model lazily and meeting the data once, the
optimiser and its schedule, and the callbacks every run has."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn as nn

from lit_internvl.checkpoint_io import check_hyperparameters, check_stage
from lit_internvl.checkpoints import load_into, read_state_dict
from lit_internvl.components.attention import Backend, set_attention_backend
from lit_internvl.data.contract import StageData
from lit_internvl.data.views import View, resolve
from lit_internvl.distributed import data_parallel_mesh, parallelize
from lit_internvl.models.vocabulary import rows_to_add

ModuleFactory = Callable[[], nn.Module]


def build(factory: ModuleFactory | nn.Module) -> nn.Module:
    """A module given as an instance (notebooks) or as a factory (YAML ``class_path``, ``functools.partial``)."""
    return factory if isinstance(factory, nn.Module) else factory()


def read_init_weights(source: str, internvl1_kind: str = "g") -> dict[str, torch.Tensor]:
    """The tensors ``init_from`` names: ``hf:/folder`` (a transformers or OpenGVLab InternVL chat checkpoint, or
    InternVL 1's released InternVL-C/-G, mapped to lit_internvl's names; ``internvl1_kind`` says which of
    InternVL-C (``"c"``) or -G (``"g"``) names the latter gets), a Lightning ``.ckpt`` or a ``.safetensors`` file."""
    if source.startswith("hf:"):
        from lit_internvl.hf import read_vlm_state_dict
        from lit_internvl.hf.internvl1 import is_internvl1, read_internvl1_state_dict
        from lit_internvl.hf.parts import part_of, read_part_state_dict

        if part_of(source[3:]) is not None:  # a vision encoder or a text-only LLM released alone
            return read_part_state_dict(source[3:])
        if is_internvl1(source[3:]):
            return read_internvl1_state_dict(source[3:], internvl1_kind)
        return read_vlm_state_dict(source[3:])
    return read_state_dict(source)


def _check_optimiser(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio) -> None:
    """Values the optimiser or its schedule would take without complaint and train wrongly with, named by key."""
    problems = []
    if learning_rate < 0:
        problems.append(f"learning_rate must be ≥ 0, got {learning_rate}")
    if weight_decay < 0:
        problems.append(f"weight_decay must be ≥ 0, got {weight_decay}")
    if not all(0 <= beta < 1 for beta in betas):
        problems.append(f"betas must lie in [0, 1), got {list(betas)}")
    if warmup_steps < 0:
        problems.append(f"warmup_steps must be ≥ 0, got {warmup_steps}")
    if not 0 <= min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if problems:
        raise ValueError("; ".join(f"model.init_args.{problem}" for problem in problems))


class Stage(L.LightningModule):
    """Base LightningModule of every stage.

    Subclasses implement :meth:`build_model`; :meth:`configure_model` calls it once (so that FSDP can
    shard the network from the meta device), meets the data (:meth:`handshake`), then loads
    ``init_from`` (a Lightning ``.ckpt`` of an earlier stage, a ``.safetensors`` file, or ``hf:/path``; a list
    loads each in turn, e.g. a vision encoder's folder and a text-only LLM's)
    by name after the prefix renames of ``init_from_rename``, reporting missing and unexpected keys.
    Subclasses report validation metrics under ``val/``; ``chance_levels`` holds the chance level of
    each such metric where one exists, for the end-of-fit report.

    The data is the trainer's datamodule, or the one given to :meth:`use_data` outside a Trainer
    (chat, notebooks); what a stage reads of it is :class:`~lit_internvl.data.contract.StageData`.
    Every constructor argument is kept in ``hparams``, the one home of a stage's configuration.

    Optimiser: AdamW over :meth:`parameter_groups` with weight decay on matrices only (not on
    norms, biases, scales), a linear warm-up of ``warmup_steps`` and a cosine decay to
    ``min_lr_ratio`` × each group's learning rate.

    Scale: :meth:`configure_model` ends with :func:`lit_internvl.distributed.parallelize`: under
    ``ModelParallelStrategy`` every transformer block and then the root become FSDP2 units on the
    mesh's ``data_parallel`` dimension (gathered in bf16 when the trainer's precision is
    ``bf16-mixed``); ``activation_checkpointing`` recomputes each block's activations in the
    backward pass, with or without sharding. Subclasses freeze parts or add adapters in
    :meth:`prepare_model`, which runs before that. ``attn_backend`` runs every attention of the model
    on one backend (None: as each component's config says).
    """

    #: The views of a record this stage trains on (:mod:`lit_internvl.data.views`), asked of the data in the
    #: handshake; a stage whose views depend on its options makes this a property.
    views: tuple[View, ...] = ()
    #: Constructor arguments that are modules or factories, kept out of ``hparams``.
    factory_arguments: tuple[str, ...] = ()
    #: The names an ``init_from: hf:`` folder of InternVL 1 (InternVL-14B-224px) is read with: InternVL-G's
    #: (``"g"``) or InternVL-C's (``"c"``, the contrastive stage).
    internvl1_kind: str = "g"

    def __init__(
        self,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        init_from: str | list[str] | None = None,
        init_from_rename: dict[str, str] | None = None,
        activation_checkpointing: bool = False,
        attn_backend: Backend | None = None,
    ) -> None:
        super().__init__()
        _check_optimiser(learning_rate, weight_decay, betas, warmup_steps, min_lr_ratio)
        # Collects the arguments of every __init__ in the subclass chain, not only this one's.
        self.save_hyperparameters(ignore=list(self.factory_arguments))
        self.model: nn.Module | None = None
        self.chance_levels: dict[str, float] = {}
        self._data: StageData | None = None

    # -- the model and the data ---------------------------------------------------------------

    @property
    def data(self) -> StageData | None:
        """The datamodule given to :meth:`use_data`, else the trainer's (None when neither exists)."""
        if self._data is not None:
            return self._data
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def use_data(self, datamodule: StageData) -> Stage:
        """Meet ``datamodule`` outside a Trainer (chat, notebooks): the model is built for it."""
        self._data = datamodule
        return self

    def build_model(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def handshake(self, model: nn.Module) -> None:
        """Check ``model`` against the data before any step runs; subclasses add their facts."""

    def ask_model_views(self, model: nn.Module) -> None:
        """Ask the data for this stage's views as ``model`` reads them (a stage whose model has visual budgets
        passes them on)."""
        self.ask_for_views()

    def ask_for_views(self, budgets: tuple[int, ...] | None = None, connector: str = "the connector") -> None:
        """Tell the data the views this stage trains on, each vision-language view's budget set from the model's
        ``budgets`` (:func:`~lit_internvl.data.views.resolve`); a view the data cannot give fails here, naming both."""
        if self.data is None or not hasattr(self.data, "use_views"):
            return
        name = f"model {type(self).__name__}"
        self.data.use_views(resolve(tuple(self.views), budgets, name, connector), name)

    def fit_vision_to_data(self, vision: nn.Module) -> None:
        """Resize a vision encoder's position table once to the data's ``tile_size`` (InternVL's
        ``force_image_size``): the resized table is a parameter that trains and is saved at that size, and
        ``init_from`` weights of any size are resized to it when loaded. Encoders without ``resize`` keep
        interpolating in their forward pass."""
        tile_size = getattr(self.data, "tile_size", None)
        if tile_size is not None and hasattr(vision, "resize"):
            vision.resize(tile_size)

    def check_vocabulary(self, embeddings: nn.Embedding, model_key: str, growable: bool = False) -> int:
        """The model's vocabulary must hold every id of the data's tokenizer, or (``growable``) grow by the tokens
        the tokenizer added: returns how many rows (:func:`~lit_internvl.models.vocabulary.rows_to_add`)."""
        tokenizer = getattr(self.data, "tokenizer", None)
        return 0 if tokenizer is None else rows_to_add(tokenizer, embeddings.num_embeddings, model_key, growable)

    def configure_model(self) -> None:
        if self.model is not None:
            if getattr(self.data, "requested", False) is None:  # built before it met its data (a notebook): meet it
                self.handshake(self.model)
            return
        h = self.hparams
        model = self.build_model()
        if h.attn_backend is not None:
            set_attention_backend(model, h.attn_backend)
        self.handshake(model)
        # Several sources load in turn (NMP: a vision encoder's folder, then a text-only LLM's).
        for source in [h.init_from] if isinstance(h.init_from, str) else h.init_from or []:
            load_into(model, read_init_weights(source, self.internvl1_kind), source, h.init_from_rename)
        self.prepare_model(model)
        self.model = self.parallelize(model, h.activation_checkpointing)

    def parallelize(self, model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
        """``model`` sharded on this stage's data-parallel mesh (gathered in bf16 under ``bf16-mixed``)."""
        mesh = data_parallel_mesh(self.device_mesh)
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        param_dtype = torch.bfloat16 if mesh is not None and precision == "bf16-mixed" else None
        return parallelize(model, mesh, activation_checkpointing, param_dtype)

    def prepare_model(self, model: nn.Module) -> None:
        """Freeze parts or add adapters to the freshly built and loaded ``model`` (before sharding)."""

    # -- optimisation -------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict]:
        """``[{"params": [...], "lr": ...}, ...]`` of the trainable parameters; stages with per-part
        learning rates override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": self.hparams.learning_rate}]

    def configure_optimizers(self):
        h = self.hparams
        groups = []
        for group in self.parameter_groups():
            # no_weight_decay: matrices of which only some rows train (models.vocabulary.train_new_rows).
            decay = [p for p in group["params"] if p.ndim >= 2 and not getattr(p, "no_weight_decay", False)]
            no_decay = [p for p in group["params"] if p.ndim < 2 or getattr(p, "no_weight_decay", False)]
            groups += [
                {"params": params, "lr": group["lr"], "weight_decay": wd}
                for params, wd in ((decay, h.weight_decay), (no_decay, 0.0))
                if params
            ]
        optimizer = torch.optim.AdamW(groups, lr=h.learning_rate, betas=h.betas)
        warmup, floor = h.warmup_steps, h.min_lr_ratio
        trainer = self.trainer
        total: list[int] = []  # the run's length, read at the first step past warm-up (below)

        def schedule(step: int) -> float:
            if step <= warmup:  # the cosine starts at 1: its length is not needed yet
                return (step + 1) / warmup if step < warmup else 1.0
            # Not read here in configure_optimizers: when a run ends by max_epochs, estimated_stepping_batches
            # builds the train loader (fit_loop.setup_data) before the checkpoint's loop state is restored, and
            # the fit loop then never hands that loader its saved position (setup_data returns early once a
            # loader exists), so a resumed run would restart its epoch from the first batch. By the first step
            # past warm-up the fit loop has built and positioned the loader itself.
            if not total:
                total.append(max(int(trainer.estimated_stepping_batches), 1))
            progress = min((step - warmup) / max(total[0] - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before the weights load: a resumed run refuses a checkpoint of another stage, and changed options that it
        cannot apply (:mod:`lit_internvl.checkpoint_io`), each named."""
        source = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        check_stage(self, checkpoint, source)
        check_hyperparameters(self, checkpoint, source)

    def configure_callbacks(self):
        from lit_internvl.callbacks.metrics_report import MetricsReport
        from lit_internvl.callbacks.resume import ExactResume
        from lit_internvl.callbacks.skipped_samples import SkippedSamples

        return [MetricsReport(), SkippedSamples(), ExactResume()]
