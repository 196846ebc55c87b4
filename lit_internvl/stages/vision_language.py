"""The base of the vision-language-model stages (SFT, MPO and the stages to come): building vision →
connector → decoder for the data, freezing, LoRA, per-part learning rates, the forward pass on a
batch, and answering prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lit_internvl.checkpoints import MODEL_FACTS
from lit_internvl.components.language import set_fused_projections
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.distributed import compile_blocks, data_parallel_mesh, world
from lit_internvl.inference.best_of_n import best_of_n
from lit_internvl.inference.critic import Aggregate
from lit_internvl.inference.generate import generate
from lit_internvl.lora import LoraOptions, add_lora
from lit_internvl.losses import HEAD_CHUNK_SIZE, HeadBackend, LossReduction, next_token_targets, supervised_positions
from lit_internvl.models.vlm import VisionLanguageModel
from lit_internvl.models.vocabulary import grow_vocabulary, train_new_rows
from lit_internvl.stages.base import ModuleFactory, Stage, build

Part = Literal["vision", "connector", "decoder"]
PARTS: tuple[Part, ...] = ("vision", "connector", "decoder")


class VisionLanguageStage(Stage):
    """Builds and trains vision encoder → connector → decoder (:class:`VisionLanguageModel`).

    The model meets its data once, when it is built (:meth:`handshake`): the decoder's vocabulary
    must hold the tokenizer's ids or grow by the tokens the tokenizer added (``add_tokens``; the new rows the
    old rows' mean, logged: :mod:`lit_internvl.models.vocabulary`), ``image_context_id`` is the tokenizer's ``<IMG_CONTEXT>`` unless set,
    the model reads tiles of the data's ``tile_size`` and its connector must give the data's
    ``tokens_per_tile`` at that size. A disagreement is an error naming both YAML keys.

    Args:
        vision, decoder: factories (YAML ``class_path``) or instances.
        connector: factory called as ``connector(vision.hidden_size, decoder.hidden_size)``, or an instance.
        image_context_id: id of ``<IMG_CONTEXT>``; default: the data tokenizer's.
        train: parts whose weights train. InternVL's recipes: ``[connector]`` for the MLP warm-up,
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
        head_chunk_size, head_backend: the training losses run the output head and the cross-entropy together over
            chunks of this many supervised positions (:func:`~lit_internvl.losses.linear_cross_entropy`), so that
            the ``(N, vocab)`` logits never exist at once; ``liger``/``cce`` use those packages' fused kernels (GPU).
        compile_blocks: ``torch.compile`` each transformer block, vision and decoder (regional compilation,
            :func:`~lit_internvl.distributed.compile_blocks`); on in the GPU recipes.
        fuse_projections: compute each decoder block's q/k/v and gate/up projections by one matmul each
            (:func:`~lit_internvl.components.language.set_fused_projections`; the weights stay apart).
        length_multiple: pad the decoder's rows to a multiple of this many tokens, so that compiled blocks see a
            bounded number of lengths (the padding is masked and its outputs dropped).
        max_new_tokens, temperature, top_p: generation in ``predict``.
        best_of, critic, critic_aggregate: with ``best_of`` N > 1, ``predict`` samples N answers per prompt (at
            ``temperature``, 1.0 if that is 0), scores each step of each with ``critic`` (a ``.ckpt`` of this
            stage's architecture, e.g. a :class:`~lit_internvl.stages.CriticStage` run's, or ``hf:/folder``) and
            returns the best by ``critic_aggregate`` of its steps' P(+), with every candidate and the majority
            vote (:mod:`lit_internvl.inference.best_of_n`); prompts need ``meta["question"]`` (what the critic reads).
            ``critic_config``: the recipe a ``.ckpt`` critic was trained with, when its architecture is not this
            stage's (a deeper decoder, say; the tokenizer and tiling must be this stage's).
        stage_options: :class:`~lit_internvl.stages.base.Stage`'s optimiser, ``init_from`` and scale options.
    """

    factory_arguments = ("vision", "connector", "decoder")

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        image_context_id: int | None = None,
        train: list[Part] = ["vision", "connector", "decoder"],  # noqa: B006 - jsonargparse needs a literal default
        unfreeze_vision_layers: int = 0,
        train_lm_head: bool | None = None,
        train_new_tokens: bool = False,
        lora: LoraOptions | None = None,
        part_lr: dict[Part, float] | None = None,
        vision_layer_decay: float = 1.0,
        loss_reduction: LossReduction = "square",
        all_reduce_loss: bool = False,
        dummy_tile: bool | None = None,
        head_chunk_size: int = HEAD_CHUNK_SIZE,
        head_backend: HeadBackend = "chunked",
        compile_blocks: bool = False,
        fuse_projections: bool = False,
        length_multiple: int | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        best_of: int = 1,
        critic: str | None = None,
        critic_config: str | None = None,
        critic_aggregate: Aggregate = "mean",
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        unknown = sorted(set(train) - set(PARTS))
        if unknown:
            raise ValueError(f"train names unknown parts {unknown}; choose from {PARTS}")
        if lora is not None:  # kept as a plain dict: checkpoints are read back with weights_only=True
            self.hparams.lora = asdict(lora if isinstance(lora, LoraOptions) else LoraOptions(**lora))
        self.factories = {"vision": vision, "connector": connector, "decoder": decoder}
        if best_of > 1 and critic is None:
            raise ValueError(f"model.init_args.best_of is {best_of}: set model.init_args.critic to score the answers")
        self._critic: list[nn.Module] = []  # a list: kept out of the module tree (state dict, checkpoints)

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
        tile_size = getattr(self.data, "tile_size", None)
        if tile_size is None:
            return
        model.tile_size = tile_size
        self.fit_vision_to_data(model.vision)
        expected, given = model.tokens_per_tile(tile_size), self.data.tokens_per_tile
        if given != expected:
            raise ValueError(
                f"data.init_args.tokens_per_tile is {given}, but at data.init_args.tile_size {tile_size} the model gives "
                f"{expected} tokens per tile ({tile_size // model.vision.patch_size}² patches through "
                f"model.init_args.connector {type(model.connector).__name__}): set data.init_args.tokens_per_tile: {expected}"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Facts about the model that its weights do not hold, for export (``read_model_facts``)."""
        if self.model is not None:
            checkpoint[MODEL_FACTS] = {
                "tile_size": self.model.tile_size,
                "image_context_id": self.model.image_context_id,
            }

    def prepare_model(self, model: VisionLanguageModel) -> None:
        """Grow the vocabulary for added tokens (after ``init_from`` loaded the old rows), apply ``train``,
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
            getattr(model, part).requires_grad_(part in h.train and part not in lora_parts)
        if "vision" not in h.train and h.unfreeze_vision_layers:
            for block in list(model.vision.layers)[-h.unfreeze_vision_layers :]:
                block.requires_grad_(True)
        if h.train_lm_head is not None:
            head = model.decoder.lm_head if model.decoder.lm_head is not None else model.decoder.embed_tokens
            head.requires_grad_(h.train_lm_head)
        if lora:
            add_lora(model, list(lora.parts), r=lora.r, alpha=lora.alpha, dropout=lora.dropout)
        if h.train_new_tokens and rows:
            if data_parallel_mesh(self.device_mesh) is not None:  # FSDP2 swaps the parameters for sharded ones
                raise ValueError(
                    "model.init_args.train_new_tokens: the gradient mask that keeps the old rows fixed does not survive "
                    "FSDP2 sharding; train the whole embeddings instead (train_lm_head: true, or decoder in train)"
                )
            train_new_rows(model.decoder, old_vocab)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"Nothing to train: train={h.train}, lora={h.lora}")

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
        set_fused_projections(model, self.hparams.fuse_projections)
        if self.hparams.compile_blocks:  # before checkpointing and sharding wrap the blocks
            compile_blocks(model)
        return super().parallelize(model, activation_checkpointing)

    # -- the forward pass ---------------------------------------------------------------------

    def forward_batch(
        self, batch: dict, model: nn.Module | None = None, logits_at: bool = True, cross_entropy: bool = False
    ) -> torch.Tensor:
        """Logits of ``model`` (default the policy) on a collated batch: ``(N, V)`` at the batch's N
        supervised positions (the only ones a loss reads), or ``(R, T, V)`` with ``logits_at=False``; with
        ``cross_entropy`` the ``(N,)`` next-token cross-entropies there instead, the head and the loss computed in
        chunks (``head_chunk_size``, ``head_backend``), for :func:`~lit_internvl.losses.reduce_token_losses`."""
        h, document_ids = self.hparams, batch.get("document_ids")
        at = supervised_positions(batch["labels"], document_ids) if logits_at and not cross_entropy else None
        return (model or self.model)(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
            positions=batch["positions"], document_ids=document_ids,
            tiles_per_sample=batch["tiles_per_sample"], sample_names=batch["sample_names"], logits_at=at,
            targets=next_token_targets(batch["labels"], document_ids) if cross_entropy else None,
            head_chunk_size=h.head_chunk_size, head_backend=h.head_backend, length_multiple=h.length_multiple,
        )  # fmt: skip

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
            if metric.update_count:
                value = metric.compute()
                self.log(f"val/{name}/{kind}", value)
                values.append(value)
            metric.reset()
        if values:
            self.log(f"val/{name}", torch.stack(values).mean())

    # -- answering prompts --------------------------------------------------------------------

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Generate answers for prompt batches (left-padded, e.g. the datamodule's predict split); an answer that
        reaches ``max_new_tokens`` before the end token is marked ``"finished": false`` and warned about."""
        tokenizer = self.data.tokenizer
        h = self.hparams
        if h.best_of > 1:
            return self.predict_best_of(batch)
        answers = generate(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["tiles_per_sample"],
            max_new_tokens=h.max_new_tokens, eos_id=tokenizer.eos_id, temperature=h.temperature, top_p=h.top_p,
            positions=batch["positions"],
        )  # fmt: skip
        out, cut = [], []
        for row, tokens in enumerate(answers):
            name, finished = batch["sample_names"][row], tokenizer.eos_id in tokens
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
            reference = (batch.get("reference") or [None] * len(answers))[row]
            meta = (batch.get("meta") or [None] * len(answers))[row]  # the question type for `evaluate`
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
        """The ``critic`` of Best-of-N, loaded once: an ``hf:`` folder, a checkpoint of ``critic_config``'s
        architecture, or one of this stage's."""
        if not self._critic:
            from lit_internvl.checkpoints import read_state_dict

            if self.hparams.critic.startswith("hf:"):
                from lit_internvl.hf import load_vlm

                critic = load_vlm(self.hparams.critic.removeprefix("hf:"), image_context_id=self.model.image_context_id)
            else:
                config = self.hparams.critic_config
                critic = (self.critic_stage(config) if config else self).build_model()
                critic.tile_size = self.model.tile_size
                critic.load_state_dict(read_state_dict(self.hparams.critic))
            self._critic = [critic.to(self.device).eval()]
        return self._critic[0]

    def critic_stage(self, recipe: str) -> Stage:
        """The stage of ``recipe``'s ``model:`` (a YAML recipe), built for this stage's data, its ``init_from`` unread:
        what builds a critic of another architecture (``critic_config``)."""
        from jsonargparse import ArgumentParser

        from lit_internvl.recipes import compose

        model = compose(recipe)["model"]
        model.setdefault("init_args", {})["init_from"] = None
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--model", type=Stage)
        stage = parser.instantiate_classes(parser.parse_object({"model": model})).model
        return stage.use_data(self.data)

    def predict_best_of(self, batch: dict) -> list[dict]:
        """Best-of-``best_of`` for each prompt of the batch (:meth:`predict_step` with ``best_of`` > 1)."""
        h, tokenizer = self.hparams, self.data.tokenizer
        tiles = torch.tensor(batch["tiles_per_sample"]).cumsum(0).tolist()
        out = []
        for row, name in enumerate(batch["sample_names"]):
            meta = (batch.get("meta") or [None] * len(batch["sample_names"]))[row] or {}
            if "question" not in meta:
                raise ValueError(f"{name}: model.init_args.best_of needs the prompt's question in meta['question']")
            real = batch["attention_mask"][row] == 1  # the prompt without its left padding
            start = tiles[row] - batch["tiles_per_sample"][row]  # the row's tiles in the batch's pixel_values
            pixels = None if batch["pixel_values"] is None else batch["pixel_values"][start : tiles[row]]
            prompt = {"input_ids": batch["input_ids"][row][real][None], "pixel_values": pixels,
                      "tiles_per_sample": [batch["tiles_per_sample"][row]]}  # fmt: skip
            result = best_of_n(
                self.model, tokenizer, prompt, meta["question"], self.critic_model(), tokenizer,
                self.data.sample_options, pixels, n=h.best_of, how=h.critic_aggregate, max_new_tokens=h.max_new_tokens,
                temperature=h.temperature or 1.0, top_p=h.top_p,
            )  # fmt: skip
            reference = (batch.get("reference") or [None] * len(batch["sample_names"]))[row]
            out.append({"name": name, "reference": reference, "meta": meta, **result})
        return out

    def configure_callbacks(self):
        from lit_internvl.callbacks.predictions import PredictionsWriter

        return [*super().configure_callbacks(), PredictionsWriter()]
