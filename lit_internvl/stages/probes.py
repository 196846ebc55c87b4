"""Probes of a trained vision encoder, as the InternVL paper judges InternViT: a linear classifier on its frozen
features (:class:`LinearProbeStage`, OpenGVLab/InternVL ``classification/``) and a per-patch linear head upsampled
to pixels (:class:`SegmentationProbeStage`, ``segmentation/``), optionally with the encoder's last blocks trained.

The encoder comes from any stage's checkpoint or a Hugging Face folder (``init_from``: its ``vision.*`` tensors load
by name, the rest is reported unexpected). What the frozen part of it computes for an image never changes, so it is
computed once: :class:`FeatureCache` keeps each image's features in memory and on disk under the encoder's digest,
and a later epoch, a resumed run or another few-shot fraction reads them instead of running the encoder again. The
frozen part runs in eval mode (no drop-path) and without gradients whatever the trainer's mode.

::

    pixels ─► embeddings ─► blocks 1 … s ─────────────(cached)──► blocks s+1 … r ─► reduce ─► head
              └──────────── frozen, eval mode, run once ─────┘    train_blocks       pool      BN + linear
                                                                  (trained)          or grid   (a 1×1 conv)

``layer`` picks r, the block whose output is read (as ``select_layer``: −1 the last); ``train_blocks`` k trains the
last k of the blocks read (s = r − k).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from lit_internvl.batch import IGNORE_MASK, ImageBatch, Views
from lit_internvl.data.views import View
from lit_internvl.metrics import MeanIoU
from lit_internvl.stages.base import ModuleFactory, Stage, build
from lit_internvl.stages.frozen import eval_mode

Pooling = Literal["cls_patch_concat", "cls", "mean"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "poly"]


# -- the frozen features, once ---------------------------------------------------------------------------------------


def module_digest(modules: list[nn.Module], extra: dict) -> str:
    """A digest of the modules' parameters and buffers (names, shapes, values) and of ``extra``: what identifies the
    features a frozen part computes."""
    digest = hashlib.blake2b(json.dumps(extra, sort_keys=True).encode(), digest_size=12)
    for module in modules:
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Features by sample name, in memory and (with ``folder``) on disk: each batch of new features one safetensors
    file (``features`` and the names in its metadata), written whole or not at all (a temporary file renamed), so
    a run killed mid-extraction keeps every batch it finished. Opening a folder reads every file in it."""

    def __init__(self, folder: str | Path | None, about: dict | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.features: dict[str, torch.Tensor] = {}
        self.written = 0
        if self.folder is None:
            return
        from safetensors import safe_open

        self.folder.mkdir(parents=True, exist_ok=True)
        if about is not None and not (self.folder / "about.json").exists():
            (self.folder / "about.json").write_text(json.dumps(about, indent=2) + "\n")
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                names = json.loads(f.metadata()["names"])
                for name, row in zip(names, f.get_tensor("features")):
                    self.features[name] = row.clone()
        if self.features:
            rank_zero_info(f"feature cache {self.folder}: {len(self.features)} images' features read")

    def lookup(self, names: list[str]) -> list[torch.Tensor | None]:
        return [self.features.get(name) for name in names]

    def add(self, names: list[str], features: torch.Tensor) -> None:
        """Keep ``features`` ``(len(names), ...)`` (on the CPU) and write them as one file."""
        features = features.detach().cpu().contiguous()
        for name, row in zip(names, features):
            self.features[name] = row
        if self.folder is None:
            return
        from safetensors.torch import save_file

        rank = os.environ.get("LOCAL_RANK", "0")
        path = self.folder / f"part-{rank}-{time.time_ns()}-{self.written}.safetensors"
        save_file({"features": features}, str(path) + ".tmp", metadata={"names": json.dumps(names)})
        os.replace(str(path) + ".tmp", path)
        self.written += 1


class Probe(nn.Module):
    """A vision encoder and a head; the encoder's blocks up to the cached ones stay in eval mode (:meth:`train`)."""

    def __init__(self, vision: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.vision, self.head = vision, head
        self.frozen_blocks = len(getattr(vision, "layers", []))

    def train(self, mode: bool = True) -> Probe:
        super().train(mode)
        self.vision.embeddings.eval()
        for block in list(self.vision.layers)[: self.frozen_blocks]:
            block.eval()
        return self


class ProbeStage(Stage):
    """The base of the probes: the encoder (``vision``, loaded by ``init_from``) frozen up to its last
    ``train_blocks`` blocks, the frozen part's features read once (module docstring), a head the subclass builds
    (:meth:`build_head`) on what :meth:`reduce` makes of the blocks' output.

    Args:
        vision: a factory (YAML ``class_path``) or an instance of an InternViT-like encoder (``embeddings``,
            ``layers``).
        layer: the block whose output the head reads, counted as transformers' ``hidden_states`` (−1: the last).
        train_blocks: train the last k of the blocks read, with the head (their input is what is cached).
        feature_cache: the folder of the features' cache (each encoder under its digest); None:
            ``<trainer.default_root_dir>/features``; ``""``: memory only.
        optimizer: ``sgd`` (Nesterov, momentum 0.9: classification/optimizer.py L67-72) or ``adamw``.
        lr_batch: the global batch ``learning_rate`` is given for; the run's is scaled linearly from it
            (classification/main.py L726); None: as given.
        schedule: ``cosine`` (timm's over the whole run, classification/lr_scheduler.py L20-30) or ``poly`` (power 1
            to 0, mmcv's, the segmentation configs'), after a linear warm-up of ``warmup_ratio`` of the run's steps.
        stage_options: :class:`~lit_internvl.stages.base.Stage`'s (``learning_rate``, ``weight_decay``, ``betas``,
            ``init_from``).
    """

    factory_arguments = ("vision",)

    def __init__(
        self,
        vision: ModuleFactory,
        layer: int = -1,
        train_blocks: int = 0,
        feature_cache: str | None = None,
        optimizer: Optimizer = "sgd",
        lr_batch: int | None = None,
        schedule: Schedule = "cosine",
        warmup_ratio: float = 0.0,
        **stage_options,
    ) -> None:
        stage_options.setdefault("warmup_steps", 0)
        super().__init__(**stage_options)
        if optimizer not in ("sgd", "adamw") or schedule not in ("cosine", "poly"):
            raise ValueError(f"model.init_args: optimizer {optimizer!r} or schedule {schedule!r} is not a known one")
        self.factories = {"vision": vision}
        self.cache: FeatureCache | None = None

    # -- the model ------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        classes = getattr(self.data, "num_classes", None) or len(getattr(self.data, "class_names", None) or [])
        if not classes:
            raise ValueError(f"{type(self).__name__}: the data names no classes (data.init_args.class_names)")
        return classes

    def build_head(self, width: int) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> Probe:
        vision = build(self.factories["vision"])
        if not hasattr(vision, "layers") or not hasattr(vision, "embeddings"):
            raise ValueError(f"model.init_args.vision {type(vision).__name__}: a probe reads an InternViT-like encoder")
        return Probe(vision, self.build_head(vision.hidden_size))

    def handshake(self, model: Probe) -> None:
        self.fit_vision_to_data(model.vision)
        self.ask_for_views()

    def blocks_read(self, vision: nn.Module) -> tuple[int, int]:
        """``(s, r)``: the blocks ``1 … s`` are frozen and cached, ``s+1 … r`` train (module docstring)."""
        h, total = self.hparams, len(vision.layers)
        read = h.layer if h.layer >= 0 else total + 1 + h.layer
        if not 0 <= read <= total or not 0 <= h.train_blocks <= read:
            raise ValueError(
                f"model.init_args: layer {h.layer} and train_blocks {h.train_blocks} do not fit an encoder of "
                f"{total} blocks"
            )
        return read - h.train_blocks, read

    def prepare_model(self, model: Probe) -> None:
        cached, read = self.blocks_read(model.vision)
        model.vision.requires_grad_(False)
        for block in list(model.vision.layers)[cached:read]:
            block.requires_grad_(True)
        model.frozen_blocks = cached

    def parallelize(self, model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
        return model  # a probe's encoder is frozen and its head small: data parallel (DDP) only, no sharding

    # -- the features ---------------------------------------------------------------------------------------------

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head reads of the blocks' output ``(B, 1 + N, C)``."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        self._open_cache()

    def on_validation_start(self) -> None:
        self._open_cache()

    def _open_cache(self) -> None:
        if self.cache is not None:
            return
        h, vision = self.hparams, self.model.vision
        cached, read = self.blocks_read(vision)
        about = {"stage": type(self).__name__, "init_from": h.init_from, "blocks": cached,
                 "reduced": cached == read, "tile_size": getattr(self.data, "tile_size", None),
                 **self.reduce_options()}  # fmt: skip
        frozen = [vision.embeddings, *list(vision.layers)[:cached]]
        folder = h.feature_cache
        if folder is None:
            folder = os.path.join(self.trainer.default_root_dir if self._trainer is not None else ".", "features")
        digest = module_digest(frozen, about)
        self.cache = FeatureCache(Path(folder) / digest if folder else None, about)

    def reduce_options(self) -> dict:
        """The options that change what :meth:`reduce` makes (part of the cache's identity)."""
        return {}

    @torch.no_grad()
    def _frozen(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision
        cached, read = self.blocks_read(vision)
        with eval_mode(vision):
            hidden = vision.embeddings(pixel_values)
            for block in list(vision.layers)[:cached]:
                hidden = block(hidden)
        return self.reduce(hidden) if cached == read else hidden

    def features(self, batch: ImageBatch) -> torch.Tensor:
        """What the head reads for ``batch``: the cached frozen features (computed for the images not seen yet), then
        the trained blocks and :meth:`reduce` when ``train_blocks`` is set."""
        if self.cache is None:
            self._open_cache()
        found = self.cache.lookup(batch.sample_names)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            new = self._frozen(batch.pixel_values[missing])
            self.cache.add([batch.sample_names[i] for i in missing], new)
            for i, row in zip(missing, new):
                found[i] = row
        features = torch.stack([f.to(self.device) for f in found])
        cached, read = self.blocks_read(self.model.vision)
        if cached == read:
            return features
        for block in list(self.model.vision.layers)[cached:read]:
            features = block(features)
        return self.reduce(features)

    # -- optimisation ---------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        scale = 1.0
        if h.lr_batch:
            devices = self.trainer.world_size if self._trainer is not None else 1
            batch = getattr(self.data, "batch_size", h.lr_batch)
            scale = batch * devices / h.lr_batch
        lr = h.learning_rate * scale
        if h.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, betas=h.betas, weight_decay=h.weight_decay)
        trainer, total = self._trainer, []

        def factor(step: int) -> float:
            if step == 0:  # read before the run's length is known (LambdaLR's first call): a warm-up starts at 0
                return 0.0 if h.warmup_ratio > 0 else 1.0
            if not total:  # read past step 0, once the fit loop has built its loader (base.Stage says why)
                total.append(max(int(trainer.estimated_stepping_batches), 1))
            return warmup_then(step, total[0], h.warmup_ratio, h.schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_then(step: int, total: int, warmup_ratio: float, schedule: Schedule) -> float:
    """The learning-rate factor at ``step`` of ``total``: ``cosine`` as timm's ``CosineLRScheduler`` with
    ``t_initial = total`` and ``warmup_lr_init = 0`` (the cosine counts from step 0, the warm-up replacing its first
    steps: classification/lr_scheduler.py L20-30); ``poly`` as mmcv's ``PolyLrUpdaterHook`` (power 1, to 0) with its
    linear warm-up from ``1e-6`` of the regular rate (segmentation/configs/intern_vit_6b/**: ``warmup_ratio=1e-6``)."""
    warmup = int(warmup_ratio * total)
    progress = min(step / total, 1.0)
    if schedule == "cosine":
        return step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
    regular = 1.0 - progress
    if step < warmup:
        return regular * (1 - (1 - step / warmup) * (1 - 1e-6))
    return regular


# -- the linear probe ------------------------------------------------------------------------------------------------


class LinearProbeStage(ProbeStage):
    """A linear classifier on the frozen encoder's image features, as InternVL's ``classification/`` trains it
    (configs/linear_probing/*.yaml): the cls token and the patches' mean, concatenated (``cls_target:
    cls_patch_concat``, models/intern_vit_6b.py L454-455), batch-normalised (``SyncBatchNorm(2C, eps=1e-6)``),
    a linear layer (weights N(0, 0.01²), bias 0: L389-406); SGD with Nesterov momentum 0.9 at 0.1 per 512 images,
    no weight decay, 10 epochs with 1 of linear warm-up and a cosine to 0 (the recipe sets ``max_epochs`` and
    ``warmup_ratio``), label smoothing 0.1 (config.py L67).

    Validation logs ``val/top1`` and ``val/top5`` (with more than 5 classes) beside chance (1/classes, 5/classes).

    Where it differs from the reference: the features are computed once, without the reference's random resized
    crop, flip and mixup/cutmix of the training images (nothing is augmented: each image is seen as the evaluation
    transform makes it), and there is no EMA of the head's weights (the reference reports the better of the head and
    its EMA, decay 0.998). Under DDP, set ``trainer.sync_batchnorm: true`` for the reference's SyncBatchNorm.

    Args:
        pooling: ``cls_patch_concat`` (the reference's), ``cls`` or ``mean`` (of the patches).
        label_smoothing: of the cross-entropy.
        probe_options: :class:`ProbeStage`'s.
    """

    views = (View("image"),)

    def __init__(
        self,
        vision: ModuleFactory,
        pooling: Pooling = "cls_patch_concat",
        label_smoothing: float = 0.1,
        **probe_options,
    ) -> None:
        for key, value in (("learning_rate", 0.1), ("lr_batch", 512), ("weight_decay", 0.0), ("warmup_ratio", 0.1)):
            probe_options.setdefault(key, value)
        super().__init__(vision, **probe_options)
        self.accuracy = nn.ModuleDict()

    def reduce_options(self) -> dict:
        return {"pooling": self.hparams.pooling}

    def build_head(self, width: int) -> nn.Module:
        width = 2 * width if self.hparams.pooling == "cls_patch_concat" else width
        linear = nn.Linear(width, self.num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        classes = self.num_classes
        metrics = {"top1": MulticlassAccuracy(num_classes=classes, average="micro")}
        if classes > 5:
            metrics["top5"] = MulticlassAccuracy(num_classes=classes, top_k=5, average="micro")
        self.accuracy = nn.ModuleDict(metrics)
        self.chance_levels.update({"val/top1": 1 / classes, "val/top5": min(5 / classes, 1.0)})
        return nn.Sequential(nn.BatchNorm1d(width, eps=1e-6), linear)

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, C)`` → ``(B, 2C)`` (cls ‖ mean of the patches), or ``(B, C)``."""
        pooling = self.hparams.pooling
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "mean":
            return hidden[:, 1:].mean(dim=1)
        return torch.cat((hidden[:, 0], hidden[:, 1:].mean(dim=1)), dim=-1)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        logits = self.model.head(self.features(images).float())
        loss = F.cross_entropy(logits, images.label, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.rows)
        return loss

    def validation_step(self, batch: Views, batch_idx: int) -> dict:
        images = batch["image"]
        logits = self.model.head(self.features(images).float())
        self.log("val/loss", F.cross_entropy(logits, images.label), sync_dist=True, batch_size=images.rows)
        for metric in self.accuracy.values():
            metric.update(logits, images.label)
        # for the sample grid (callbacks/sample_logger.yaml): each image's predicted and true class
        return {"probe": {"predicted": logits.argmax(-1), "true": images.label}}

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.accuracy.items():
            self.log(f"val/{name}", metric.compute())
            metric.reset()


# -- the segmentation probe ------------------------------------------------------------------------------------------


class SegmentationProbeStage(ProbeStage):
    """A per-patch linear head on the encoder's patch features, upsampled to pixels, as InternVL's ``segmentation/``
    linear probing (configs/intern_vit_6b/linear_probing/*.py): the cls token dropped and the patches laid on their
    grid (mmseg_custom/models/backbones/intern_vit_6b.py L404-408), ``FCNHead`` with no convolution —
    ``SyncBatchNorm(C)`` then a 1×1 convolution to the classes (decode_heads/fcn_head.py L74-101, weights N(0, 0.01²))
    — the logits resized bilinearly to the mask and cross-entropy over the pixels not marked 255 (mmseg's
    ``ignore_index``); AdamW at 4e-5 with no weight decay, a linear warm-up and a linear decay to 0 (``poly``, power 1).

    The reference's frozen probe of InternViT-6B reads block 45 of 48 (``out_indices=[44]``: ``layer: -4``); its
    few-shot runs (configs/intern_vit_6b/few_shot/*.py) train the whole encoder with the head (weight decay 0.05,
    layer decay 0.95, drop-path 0.4) for 5k … 80k iterations as the data grows 1/16 … 1/1: ``train_blocks`` trains
    the last blocks here, at one learning rate (no layer decay).

    Validation logs ``val/mIoU`` (per-class intersection over union summed over the epoch, averaged over the classes
    present: mmseg's ``mean_iou``) and ``val/pixel_accuracy``, beside chance: every pixel given the most frequent
    class.

    Args:
        probe_options: :class:`ProbeStage`'s.
    """

    views = (View("mask"),)

    def __init__(self, vision: ModuleFactory, **probe_options) -> None:
        for key, value in (("learning_rate", 4e-5), ("optimizer", "adamw"), ("schedule", "poly"),
                           ("weight_decay", 0.0), ("betas", (0.9, 0.999)), ("warmup_ratio", 1500 / 80000)):  # fmt: skip
            probe_options.setdefault(key, value)
        super().__init__(vision, **probe_options)
        self.iou: MeanIoU | None = None

    def build_head(self, width: int) -> nn.Module:
        conv = nn.Conv2d(width, self.num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        self.iou = MeanIoU(self.num_classes, ignore_index=IGNORE_MASK)
        return nn.Sequential(nn.BatchNorm2d(width), conv)

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, C)`` → ``(B, C, g, g)``: the patches on their square grid."""
        patches = hidden[:, 1:]
        grid = math.isqrt(patches.shape[1])
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid)

    def logits(self, masks: ImageBatch) -> torch.Tensor:
        """``(B, classes, S, S)``: the head's per-patch logits resized bilinearly to the pixels."""
        patch_logits = self.model.head(self.features(masks).float())
        return F.interpolate(patch_logits, size=masks.pixel_values.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, batch: Views, batch_idx: int) -> torch.Tensor:
        masks = batch["mask"]
        loss = F.cross_entropy(self.logits(masks), masks.mask, ignore_index=IGNORE_MASK)
        self.log("train/loss", loss, prog_bar=True, batch_size=masks.rows)
        return loss

    def validation_step(self, batch: Views, batch_idx: int) -> dict:
        masks = batch["mask"]
        logits = self.logits(masks)
        self.log("val/loss", F.cross_entropy(logits, masks.mask, ignore_index=IGNORE_MASK), sync_dist=True,
                 batch_size=masks.rows)  # fmt: skip
        predicted = logits.argmax(dim=1)
        self.iou.update(predicted, masks.mask)
        return {"probe": {"predicted_mask": predicted, "true_mask": masks.mask}}

    def on_validation_epoch_end(self) -> None:
        scores = self.iou.compute()
        for name in ("mIoU", "pixel_accuracy"):
            self.log(f"val/{name}", scores[name])
            self.chance_levels[f"val/{name}"] = float(scores[f"chance_{name}"])
        self.iou.reset()
