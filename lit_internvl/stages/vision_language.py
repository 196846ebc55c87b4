"""The base of the vision-language-model stages (SFT, MPO and the stages to come): building vision →
connector → decoder for the data, freezing, LoRA, per-part learning rates, the forward pass on a
batch, and answering prompts."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lit_internvl.batch import Batch, Views
from lit_internvl.checkpoints import MODEL_FACTS
from lit_internvl.components.language import set_fused_projections
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.data.views import View
from lit_internvl.distributed import (
    compile_blocks,
    data_parallel_mesh,
    sequence_parallel_group,
    updated_on_any_rank,
    world,
)
from lit_internvl.inference.best_of_n import best_of_n_rows
from lit_internvl.inference.critic import load_critic
from lit_internvl.inference.generate import generate
from lit_internvl.lora import LoraOptions, add_lora
from lit_internvl.losses import LossReduction, next_token_targets, supervised_positions
from lit_internvl.models.routing import route_batch, routes
from lit_internvl.models.vlm import CrossEntropy, Logits, VisionLanguageModel
from lit_internvl.models.vocabulary import grow_vocabulary, train_new_rows
from lit_internvl.recipes import stage_of_recipe
from lit_internvl.stages.base import ModuleFactory, Stage, build
from lit_internvl.stages.frozen import Frozen
from lit_internvl.stages.options import GenerationOptions, SpeedOptions, as_options

Part = Literal["vision", "connector", "decoder"]
PARTS: tuple[Part, ...] = ("vision", "connector", "decoder")

# Every vision-language stage overrides on_after_batch_transfer (routing, below) and meets a LightningDataModule, which
# Lightning reports once a run although it is what is meant: the stage's hook is the one that runs.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a"
)


class VisionLanguageStage(Stage):
    """Builds and trains vision encoder → connector → decoder (:class:`VisionLanguageModel`).

    The model meets its data once, when it is built (:meth:`handshake`): the decoder's vocabulary
    must hold the tokenizer's ids or grow by the tokens the tokenizer added (``add_tokens``; the new rows the
    old rows' mean, logged: :mod:`lit_internvl.models.vocabulary`), ``image_context_id`` is the tokenizer's
    ``<IMG_CONTEXT>`` unless set, the model reads tiles of the data's ``tile_size``, and the stage asks the data for
    its :attr:`views` with the connector's budgets at that size (the first, unless a view names another). A
    disagreement is an error naming both YAML keys.

    Args:
        vision, decoder: factories (YAML ``class_path``) or instances.
        connector: factory called as ``connector(vision.hidden_size, decoder.hidden_size)``, or an instance.
        image_context_id: id of ``<IMG_CONTEXT>``; default: the data tokenizer's.
        trainable: parts whose weights train. InternVL's recipes: ``[connector]`` for the MLP warm-up,
            ``[connector, decoder]`` or all three for full SFT.
        unfreeze_vision_layers: also train the last k vision blocks when ``vision`` is frozen.
        train_lm_head: override whether the decoder's output head trains (None: as the decoder).
        train_new_tokens: when the vocabulary grew, train the new rows of the embeddings and head even where the
            decoder is frozen or under LoRA (only those rows; without it they train only with the decoder).
        lora: adapters on ``lora.parts`` (:class:`~lit_internvl.lora.LoraOptions`); those parts'
            own weights are frozen, the adapters are the only weights there that train.
        part_lr: learning rate per part (e.g. ``{vision: 1e-5}``); others use ``learning_rate``.
        vision_layer_decay: layer-wise decay of the vision learning rate: block i of L gets
            ``lr · decay^(L − i)``, the embeddings ``lr · decay^(L + 1)``.
        loss_reduction: ``token``, ``sample`` or ``square`` (InternVL 2.5/3's default).
        all_reduce_loss: normalise the loss by the weight of the global batch.
        dummy_tile: run the vision encoder on one zero-weighted black tile when a batch has no image
            (:class:`~lit_internvl.models.vlm.VisionLanguageModel`), so that every rank's FSDP2 collectives
            match; None: whenever more than one process trains.
        speed: how a step runs (:class:`~lit_internvl.stages.options.SpeedOptions`: the chunked head, compiled
            blocks, fused projections, padded lengths).
        generation: how ``predict`` answers and the critic that judges answers
            (:class:`~lit_internvl.stages.options.GenerationOptions`: ``max_new_tokens``, sampling, Best-of-N).
        stage_options: :class:`~lit_internvl.stages.base.Stage`'s optimiser, ``init_from`` and scale options.
    """

    factory_arguments = ("vision", "connector", "decoder")
    views = (View("conversation"),)
    #: Whether a routing connector (InternVL3.5-Flash's, ``route: true``) routes this stage's batches
    #: (:meth:`on_after_batch_transfer`); the ViCO stages choose their budgets themselves.
    route_batches: bool = True

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        image_context_id: int | None = None,
        trainable: list[Part] = ["vision", "connector", "decoder"],  # noqa: B006 - jsonargparse needs a literal default
        unfreeze_vision_layers: int = 0,
        train_lm_head: bool | None = None,
        train_new_tokens: bool = False,
        lora: LoraOptions | None = None,
        part_lr: dict[Part, float] | None = None,
        vision_layer_decay: float = 1.0,
        loss_reduction: LossReduction = "square",
        all_reduce_loss: bool = False,
        dummy_tile: bool | None = None,
        speed: SpeedOptions | None = None,
        generation: GenerationOptions | None = None,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown:
            raise ValueError(f"model.init_args.trainable names unknown parts {unknown}; choose from {PARTS}")
        if lora is not None:  # kept as a plain dict: checkpoints are read back with weights_only=True
            self.hparams.lora = asdict(lora if isinstance(lora, LoraOptions) else LoraOptions(**lora))
        self.speed, self.generation = as_options(speed, SpeedOptions), as_options(generation, GenerationOptions)
        self.hparams.speed, self.hparams.generation = asdict(self.speed), asdict(self.generation)
        self.factories = {"vision": vision, "connector": connector, "decoder": decoder}
        g = self.generation
        if g.best_of > 1 and g.critic is None:
            raise ValueError(
                f"model.init_args.generation.best_of is {g.best_of}: set model.init_args.generation.critic to score "
                "the answers"
            )
        self.critic = Frozen.loaded(self._load_critic) if g.critic else None

    # -- the model and the data ---------------------------------------------------------------

    def build_model(self) -> VisionLanguageModel:
        vision, decoder = build(self.factories["vision"]), build(self.factories["decoder"])
        connector = self.factories["connector"]
        if not isinstance(connector, nn.Module):
            connector = connector(vision.hidden_size, decoder.hidden_size)
        image_context_id = self.hparams.image_context_id
        if image_context_id is None:
            tokenizer = getattr(self.data, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "model.init_args.image_context_id is not set and there is no data tokenizer to read it from"
                )
            image_context_id = tokenizer.token_to_id(IMG_CONTEXT)
        return VisionLanguageModel(vision, connector, decoder, image_context_id)

    def handshake(self, model: VisionLanguageModel) -> None:
        self.check_vocabulary(model.decoder.embed_tokens, "model.init_args.decoder", growable=True)
        if self.data is None:
            return
        tile_size = getattr(self.data, "tile_size", None)
        if tile_size is not None:  # None: data without images of its own size; the model reads its native tiles
            model.tile_size = tile_size
            self.fit_vision_to_data(model.vision)
        self.ask_model_views(model)

    def ask_model_views(self, model: VisionLanguageModel) -> None:
        """The views at the connector's budgets for the tile size the model reads; then the metrics that read the data
        as the views make it."""
        tile_size = model.tile_size
        connector = (
            f"model.init_args.connector {type(model.connector).__name__} ({tile_size // model.vision.patch_size}² "
            f"patches of a data.init_args.tile_size {tile_size} tile)"
        )
        self.ask_for_views(model.budgets(tile_size), connector)
        self.setup_metrics()

    def setup_metrics(self) -> None:
        """Set up the metrics that read the data as the views make it (per-type accuracy), once the handshake has
        agreed the views."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Facts about the model that its weights do not hold, for export (``read_model_facts``)."""
        if self.model is not None:
            checkpoint[MODEL_FACTS] = {
                "tile_size": self.model.tile_size,
                "image_context_id": self.model.image_context_id,
            }

    def prepare_model(self, model: VisionLanguageModel) -> None:
        """Grow the vocabulary for added tokens (after ``init_from`` loaded the old rows), apply ``trainable``,
        ``unfreeze_vision_layers``, ``train_lm_head``, ``lora`` and ``train_new_tokens`` (before sharding)."""
        h = self.hparams
        old_vocab = model.decoder.embed_tokens.num_embeddings
        rows = self.check_vocabulary(model.decoder.embed_tokens, "model.init_args.decoder", growable=True)
        if rows:
            grown = grow_vocabulary(model.decoder, rows)
            rank_zero_info(f"model.init_args.decoder: {grown}, for the tokens data.init_args.tokenizer added")
        model.dummy_tile = h.dummy_tile if h.dummy_tile is not None else world()[1] > 1
        lora = LoraOptions(**h.lora) if h.lora else None
        lora_parts = set(lora.parts) if lora else set()
        for part in PARTS:
            getattr(model, part).requires_grad_(part in h.trainable and part not in lora_parts)
        if "vision" not in h.trainable and h.unfreeze_vision_layers:
            for block in list(model.vision.layers)[-h.unfreeze_vision_layers :]:
                block.requires_grad_(True)
        if h.train_lm_head is not None:
            head = model.decoder.lm_head if model.decoder.lm_head is not None else model.decoder.embed_tokens
            head.requires_grad_(h.train_lm_head)
        if lora:
            add_lora(model, list(lora.parts), r=lora.r, alpha=lora.alpha, dropout=lora.dropout, experts=lora.experts)
        if h.train_new_tokens and rows:
            if data_parallel_mesh(self.device_mesh) is not None:  # FSDP2 swaps the parameters for sharded ones
                raise ValueError(
                    "model.init_args.train_new_tokens: the gradient mask that keeps the old rows fixed does not survive "
                    "FSDP2 sharding; train the whole embeddings instead (train_lm_head: true, or decoder in train)"
                )
            train_new_rows(model.decoder, old_vocab)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"Nothing to train: trainable={h.trainable}, lora={h.lora}")

    def parameter_groups(self) -> list[dict]:
        h = self.hparams
        part_lr = dict(h.part_lr or {})
        groups: dict[float, list] = {}
        vision_layers = len(self.model.vision.layers) if hasattr(self.model.vision, "layers") else 0
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            part = name.split(".", 1)[0]
            lr = part_lr.get(part, h.learning_rate)
            if part == "vision" and h.vision_layer_decay != 1.0:
                depth = int(name.split(".")[2]) + 1 if name.startswith("vision.layers.") else 0
                lr *= h.vision_layer_decay ** (vision_layers + 1 - depth)
            groups.setdefault(lr, []).append(param)
        return [{"params": params, "lr": lr} for lr, params in groups.items()]

    def parallelize(self, model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
        # Under SequenceParallelStrategy its rows are split over the mesh's sequence-parallel groups.
        model.sequence_parallel = sequence_parallel_group(self.device_mesh)
        set_fused_projections(model, self.speed.fuse_projections)
        if self.speed.compile_blocks:  # before checkpointing and sharding wrap the blocks
            compile_blocks(model)
        return super().parallelize(model, activation_checkpointing)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With a connector that routes (InternVL3.5-Flash), every vision-language view's tiles at the first budget
        take the budget the router picks and the rows shorten to match (:mod:`lit_internvl.models.routing`; prompts
        stay left-padded), before any step sees the batch: training, validation, predict, rollouts and Best-of-N all
        run on the routed sequence, the policy and a reference alike."""
        if not self.route_batches or self.model is None or not routes(self.model) or not isinstance(batch, Views):
            return batch
        kinds = {view.name: view.kind for view in (getattr(self.data, "requested", None) or ())}
        for name, view in list(batch.views.items()):
            if isinstance(view, Batch):  # without images too: route_batch keeps a sharded run's collectives aligned
                side = "left" if kinds.get(name, name) == "prompt" else "right"
                batch.views[name] = route_batch(self.model, view, side)
        return batch

    # -- the forward pass ---------------------------------------------------------------------

    def forward_batch(
        self, batch: Batch, model: nn.Module | None = None, logits_at: bool = True, cross_entropy: bool = False
    ) -> torch.Tensor:
        """Logits of ``model`` (default the policy) on one view's batch: ``(N, V)`` at the batch's N
        supervised positions (the only ones a loss reads), or ``(R, T, V)`` with ``logits_at=False``; with
        ``cross_entropy`` the ``(N,)`` next-token cross-entropies there instead, the head and the loss computed in
        chunks (``speed.head_chunk_size``, ``speed.head_backend``), for
        :func:`~lit_internvl.losses.reduce_token_losses`."""
        h = self.speed
        if cross_entropy:
            targets = next_token_targets(batch.labels, batch.document_ids)
            head = CrossEntropy(targets, h.head_chunk_size, h.head_backend)
        else:
            head = Logits(supervised_positions(batch.labels, batch.document_ids) if logits_at else None)
        return (model or self.model)(
            batch.input_ids, batch.images, attention_mask=batch.attention_mask, positions=batch.positions,
            document_ids=batch.document_ids, sample_names=batch.sample_names, length_multiple=h.length_multiple,
            head=head,
        )  # fmt: skip

    def moe_aux_loss(self, batch_size: int) -> torch.Tensor | None:
        """``moe.aux_loss_coef`` × the load-balancing loss of the policy decoder's last forward, for the training loss
        (logged as ``train/aux_loss``, the loss before the coefficient; transformers' Qwen3MoeForCausalLM and
        InternVL's ``modeling_internvl_chat.py`` add it the same way); None for a decoder without experts, a zero
        coefficient, or a forward without gradients (evaluation). Read it right after the policy's forward: another
        forward through the same decoder (MPO's reference under LoRA) replaces the router logits. Over the global
        batch with ``all_reduce_loss``, as the language-model loss."""
        decoder = self.model.decoder
        moe = getattr(getattr(decoder, "config", None), "moe", None)
        if moe is None or not moe.aux_loss_coef or not torch.is_grad_enabled():
            return None
        aux = decoder.aux_loss(all_reduce=self.hparams.all_reduce_loss)
        self.log("train/aux_loss", aux.detach(), batch_size=batch_size)
        return moe.aux_loss_coef * aux

    # -- accuracy per question type (SFT's exact match, RL's greedy answers) -------------------------

    def type_metrics(self, metrics: nn.ModuleDict, name: str) -> None:
        """One running mean in ``metrics`` for each of the data's ``question_types``, and their chance levels as
        ``val/{name}/{type}`` and ``val/{name}`` (the mean over types)."""
        types = getattr(self.data, "question_types", None) or {}
        for kind, chance in types.items():
            if kind not in metrics:
                metrics[kind] = MeanMetric()
            self.chance_levels[f"val/{name}/{kind}"] = chance
        if types:
            self.chance_levels[f"val/{name}"] = sum(types.values()) / len(types)

    def log_type_metrics(self, metrics: nn.ModuleDict, name: str) -> None:
        """Log each type's mean as ``val/{name}/{type}`` and their mean as ``val/{name}``; reset them."""
        values = []
        for kind, metric in metrics.items():
            if updated_on_any_rank(metric):
                value = metric.compute()
                self.log(f"val/{name}/{kind}", value)
                values.append(value)
            metric.reset()
        if values:
            self.log(f"val/{name}", torch.stack(values).mean())

    # -- answering prompts --------------------------------------------------------------------

    def predict_step(self, batch: Views, batch_idx: int) -> list[dict]:
        """Generate answers for prompt batches (the ``prompt`` view, left-padded: the datamodule's predict split); an
        answer that reaches ``max_new_tokens`` before the end token is marked ``"finished": false`` and warned about."""
        tokenizer = self.data.tokenizer
        h, batch = self.generation, batch["prompt"]
        if h.best_of > 1:
            return self.predict_best_of(batch)
        answers = generate(
            self.model, batch.input_ids, batch.attention_mask, batch.images, max_new_tokens=h.max_new_tokens,
            eos_id=tokenizer.eos_id, temperature=h.temperature, top_p=h.top_p, positions=batch.positions,
        )  # fmt: skip
        out, cut = [], []
        for row, tokens in enumerate(answers):
            name, finished = batch.sample_names[row], tokenizer.eos_id in tokens
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
            reference = (batch.reference or [None] * len(answers))[row]
            meta = (batch.meta or [None] * len(answers))[row]  # the question type for `evaluate`
            out.append({"name": name, "answer": text, "reference": reference, "meta": meta, "finished": finished})
            if not finished:
                cut.append(name)
        if cut:
            rank_zero_warn(
                f"{len(cut)} answers of batch {batch_idx} ({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''}) "
                f'reached max_new_tokens={h.max_new_tokens} before an end token and are cut off ("finished": false)'
            )
        return out

    def critic_model(self) -> nn.Module:
        """The ``critic`` of Best-of-N (and of RL's critic reward), loaded once: an ``hf:`` folder, a checkpoint of
        ``critic_config``'s architecture, or one of this stage's (:func:`~lit_internvl.inference.critic.load_critic`)."""
        if self.critic is None:
            raise ValueError("model.init_args.generation.critic is not set: no critic to score answers with")
        return self.critic.model(self.device)

    def _load_critic(self) -> nn.Module:
        config = self.generation.critic_config
        if config:  # another architecture, read off its recipe (the tokenizer and tiling are this stage's)
            build = lambda: stage_of_recipe(config).use_data(self.data).build_model()  # noqa: E731
        else:
            build = self.build_model
        return load_critic(self.generation.critic, self.model, build)

    def predict_best_of(self, batch: Batch) -> list[dict]:
        """Best-of-``best_of`` for each prompt of the batch (:meth:`predict_step` with ``best_of`` > 1)."""
        h, tokenizer = self.generation, self.data.tokenizer
        return best_of_n_rows(
            self.model, tokenizer, batch, self.critic_model(), self.data.sample_options, n=h.best_of,
            how=h.critic_aggregate, max_new_tokens=h.max_new_tokens, temperature=h.temperature or 1.0, top_p=h.top_p,
        )  # fmt: skip

    def configure_callbacks(self):
        from lit_internvl.callbacks.predictions import PredictionsWriter

        return [*super().configure_callbacks(), PredictionsWriter()]
