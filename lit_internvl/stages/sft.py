"""Supervised fine-tuning of the chat model (InternVL 1.5–3 stage 1.5 / 2): a VisionLanguageModel
trained on conversations, with freezing policies, LoRA and per-part learning rates."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.inference.generate import generate
from lit_internvl.lora import add_lora
from lit_internvl.losses import IGNORE_INDEX, language_model_loss, next_token_targets, supervised_positions
from lit_internvl.models.vlm import VisionLanguageModel
from lit_internvl.stages.base import ModuleFactory, Stage, build

PARTS = ("vision", "connector", "decoder")


class SFTStage(Stage):
    """Trains vision encoder → connector → decoder on next-token prediction of the answers.

    Args:
        vision, decoder: factories (YAML ``class_path``) or instances.
        stage_options: :class:`Stage`'s optimiser (``learning_rate``, ``weight_decay``, ``betas``,
            ``warmup_steps``, ``min_lr_ratio``), ``init_from``/``init_from_rename`` and ``activation_checkpointing``.
        connector: factory called as ``connector(vision.hidden_size, decoder.hidden_size)``, or an instance.
        image_context_id: id of ``<IMG_CONTEXT>``; default: the datamodule tokenizer's.
        train: parts whose weights train. InternVL's recipes: ``[connector]`` for the MLP warm-up,
            ``[connector, decoder]`` or all three for full SFT.
        unfreeze_vision_layers: also train the last k vision blocks when ``vision`` is frozen.
        train_lm_head: override whether the decoder's output head trains (None: as the decoder).
        lora: ``{parts: [decoder, vision], r: 16, alpha: 2r, dropout: 0.05}``: adapters on those
            parts (the only trainable weights there; :mod:`lit_internvl.lora` has the targets).
        part_lr: learning rate per part (e.g. ``{vision: 1e-5}``); others use ``learning_rate``.
        vision_layer_decay: layer-wise decay of the vision learning rate: block i of L gets
            ``lr · decay^(L − i)``, the embeddings ``lr · decay^(L + 1)``.
        loss_reduction: ``token``, ``sample`` or ``square`` (InternVL 2.5/3's default).
        all_reduce_loss: normalise the loss by the weight of the global batch.
        max_new_tokens, temperature, top_p: generation in ``predict``.

    Validation logs ``val/loss`` and, when batches carry ``meta`` with an ``answer`` and a ``type``
    (the shapes world), exact-match accuracy per question type: a sample counts when every answer
    token (and the end token) is the model's argmax given the reference prefix, which is exactly
    when greedy decoding reproduces the answer.
    """

    def __init__(
        self,
        vision: ModuleFactory,
        connector: Callable[[int, int], nn.Module],
        decoder: ModuleFactory,
        image_context_id: int | None = None,
        train: list[str] = ["vision", "connector", "decoder"],  # noqa: B006 - jsonargparse needs a literal default
        unfreeze_vision_layers: int = 0,
        train_lm_head: bool | None = None,
        lora: dict | None = None,
        part_lr: dict[str, float] | None = None,
        vision_layer_decay: float = 1.0,
        loss_reduction: str = "square",
        all_reduce_loss: bool = False,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        **stage_options,
    ) -> None:
        super().__init__(**stage_options)
        unknown = sorted(set(train) - set(PARTS))
        if unknown:
            raise ValueError(f"train names unknown parts {unknown}; choose from {PARTS}")
        self.save_hyperparameters(ignore=["vision", "connector", "decoder"])
        self.factories = {"vision": vision, "connector": connector, "decoder": decoder}
        self.answer_accuracy = nn.ModuleDict()

    def build_model(self) -> VisionLanguageModel:
        vision, decoder = build(self.factories["vision"]), build(self.factories["decoder"])
        connector = self.factories["connector"]
        if not isinstance(connector, nn.Module):
            connector = connector(vision.hidden_size, decoder.hidden_size)
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None) if self._trainer else None
        if tokenizer is not None and tokenizer.vocab_size > decoder.embed_tokens.num_embeddings:
            raise ValueError(
                f"The datamodule's tokenizer has {tokenizer.vocab_size} ids but the decoder's vocabulary holds "
                f"{decoder.embed_tokens.num_embeddings}: choose a decoder config for this tokenizer"
            )
        image_context_id = self.hparams.image_context_id
        if image_context_id is None:
            if tokenizer is None:
                raise ValueError("image_context_id is not set and no datamodule tokenizer is available to look it up")
            image_context_id = tokenizer.token_to_id(IMG_CONTEXT)
        return VisionLanguageModel(vision, connector, decoder, image_context_id)

    def prepare_model(self, model: VisionLanguageModel) -> None:
        """Apply ``train``, ``unfreeze_vision_layers``, ``train_lm_head`` and ``lora`` (before sharding)."""
        h = self.hparams
        for part in PARTS:
            getattr(model, part).requires_grad_(part in h.train)
        if "vision" not in h.train and h.unfreeze_vision_layers:
            for block in list(model.vision.layers)[-h.unfreeze_vision_layers :]:
                block.requires_grad_(True)
        if h.train_lm_head is not None:
            head = model.decoder.lm_head if model.decoder.lm_head is not None else model.decoder.embed_tokens
            head.requires_grad_(h.train_lm_head)
        if h.lora:
            options = dict(h.lora)
            parts = options.pop("parts", ["decoder"])
            frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
            add_lora(model, parts, **options)
            # LoRA trains its adapters; the parts it does not touch keep their train/freeze setting.
            for name, param in model.named_parameters():
                if "lora_" not in name and not any(name.startswith(f"{part}.") for part in parts):
                    param.requires_grad = name not in frozen
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
            lr = part_lr.get(part, self.learning_rate)
            if part == "vision" and h.vision_layer_decay != 1.0:
                depth = int(name.split(".")[2]) + 1 if name.startswith("vision.layers.") else 0
                lr *= h.vision_layer_decay ** (vision_layers + 1 - depth)
            groups.setdefault(lr, []).append(param)
        return [{"params": params, "lr": lr} for lr, params in groups.items()]

    # -- training -----------------------------------------------------------------------------

    def forward_batch(self, batch: dict) -> torch.Tensor:
        """Logits ``(N, V)`` at the batch's N supervised positions (the only ones the loss reads)."""
        return self.model(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
            positions=batch["positions"], document_ids=batch["document_ids"],
            tiles_per_sample=batch["tiles_per_sample"], sample_names=batch["sample_names"],
            logits_at=supervised_positions(batch["labels"], batch["document_ids"]),
        )  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"] is None:  # every sample of the batch was a skipped bad record
            return None
        logits = self.forward_batch(batch)
        h = self.hparams
        loss = language_model_loss(logits, batch["labels"], batch["document_ids"], h.loss_reduction, h.all_reduce_loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["sample_names"]))
        return loss

    # -- evaluation ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        types = getattr(getattr(self.trainer, "datamodule", None), "question_types", None) or {}
        for kind, chance in types.items():
            if kind not in self.answer_accuracy:
                self.answer_accuracy[kind] = MeanMetric()
            self.chance_levels[f"val/answer_accuracy/{kind}"] = chance
        if types:
            self.chance_levels["val/answer_accuracy"] = sum(types.values()) / len(types)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"] is None:
            return
        logits = self.forward_batch(batch)
        loss = language_model_loss(logits, batch["labels"], batch["document_ids"], "token")
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["sample_names"]))
        metas = batch.get("meta") or []
        if not any(m and "type" in m for m in metas):
            return
        targets = next_token_targets(batch["labels"], batch["document_ids"])
        supervised = targets != IGNORE_INDEX
        wrong = torch.zeros_like(supervised)
        wrong[supervised] = logits.argmax(dim=-1) != targets[supervised]
        exact = ~wrong.any(dim=1)
        for row, meta in enumerate(metas):
            if meta and meta.get("type") in self.answer_accuracy:
                self.answer_accuracy[meta["type"]].update(exact[row].float())

    def on_validation_epoch_end(self) -> None:
        values = []
        for kind, metric in self.answer_accuracy.items():
            if metric.update_count:
                value = metric.compute()
                self.log(f"val/answer_accuracy/{kind}", value)
                values.append(value)
            metric.reset()
        if values:
            self.log("val/answer_accuracy", torch.stack(values).mean())

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Generate answers for prompt batches (left-padded, e.g. the datamodule's predict split); an answer that
        reaches ``max_new_tokens`` before the end token is marked ``"finished": false`` and warned about."""
        tokenizer = self.trainer.datamodule.tokenizer
        h = self.hparams
        answers = generate(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["tiles_per_sample"],
            max_new_tokens=h.max_new_tokens, eos_id=tokenizer.eos_id, temperature=h.temperature, top_p=h.top_p,
        )  # fmt: skip
        out, cut = [], []
        for row, tokens in enumerate(answers):
            name, finished = batch["sample_names"][row], tokenizer.eos_id in tokens
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
            reference = (batch.get("reference") or [None] * len(answers))[row]
            out.append({"name": name, "answer": text, "reference": reference, "finished": finished})
            if not finished:
                cut.append(name)
        if cut:
            rank_zero_warn(
                f"{len(cut)} answers of batch {batch_idx} ({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''}) "
                f"reached max_new_tokens={h.max_new_tokens} before an end token and are cut off (\"finished\": false)"
            )
        return out

    def configure_callbacks(self):
        from lit_internvl.callbacks.predictions import PredictionsWriter

        return [*super().configure_callbacks(), PredictionsWriter()]
