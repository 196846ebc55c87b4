"""Labelled images for the probes of a vision encoder: an image with its class (the ``image`` view, the linear
probe) or with its pixel mask (the ``mask`` view, the segmentation probe), from a user's files or the shapes world.

Sources:

- an image folder ``root/<class name>/<image>`` (torchvision's ``ImageFolder`` layout, as ImageNet's): the classes
  are the sub-folders in sorted order;
- a jsonl file of ``{"image": path, "label": int or class name}`` or ``{"image": path, "mask": path}`` (the mask a
  PNG of class ids, 255 where no class counts: mmsegmentation's ``ignore_index``), paths relative to the file's
  folder (or ``image_root``) and never leaving it;
- the shapes world (:class:`ShapesImagesDataModule`): one object and its class (30 classes, colour × shape) or a scene
  of several and its mask (:meth:`~lit_internvl.data.shapes.world.ShapesWorld.mask`).

Every image becomes one ``tile_size`` tile as InternVL's linear-probe evaluation transform makes it
(classification/dataset/build.py L277-283): resized bicubically so that its shorter side is ``tile_size``, centre
cropped, ImageNet-normalised; a mask follows it with nearest-neighbour resizing. No augmentation, training included:
the probes read each image's features once and keep them (:mod:`lit_internvl.stages.probes`). ``fraction`` keeps a
seeded random subset of the training images (the few-shot protocol: ADE20K's 1/16 … 1/1 in InternVL's
``segmentation/configs/_base_/datasets/ade20k_504x504_1of16.py``, ``mmseg_custom/datasets/ade.py`` L95-97), the same
subset in every run and each smaller one inside the larger.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lit_internvl.batch import ImageBatch, Views
from lit_internvl.data.images import DEFAULT_MAX_PIXELS, UnusableImage, open_image, to_tensor
from lit_internvl.data.records import resolve_image_path
from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler, replicas
from lit_internvl.data.shapes.world import COLOURS, SHAPES, MaskClasses, ShapesWorld, Split, class_names
from lit_internvl.data.views import View, check_offered

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def center_tile(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """``image`` resized so that its shorter side is ``size`` (``resample``), then centre-cropped to ``size × size``
    (torchvision's ``Resize(size)`` + ``CenterCrop(size)``)."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, resample)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a normalised ``(3, size, size)`` tile."""
    return to_tensor(center_tile(image.convert("RGB"), size, Image.Resampling.BICUBIC))


def mask_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    """A mask of class ids as a ``(size, size)`` long tensor, resized and cropped as its image (nearest)."""
    return torch.from_numpy(np.asarray(center_tile(mask, size, Image.Resampling.NEAREST), dtype=np.int64).copy())


def collate_images(samples: list[dict], view: str) -> Views:
    """Samples ``{"pixel_values", "label", "mask"?, "name"}`` → ``Views({view: ImageBatch})``."""
    masks = [s.get("mask") for s in samples]
    batch = ImageBatch(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        label=torch.tensor([s.get("label", -1) for s in samples], dtype=torch.long),
        mask=torch.stack(masks) if all(m is not None for m in masks) else None,
        sample_names=[s["name"] for s in samples],
    )
    return Views({view: batch})


def subset(size: int, fraction: float, seed: int) -> list[int]:
    """The first ``ceil(fraction · size)`` indices of a permutation seeded by ``seed``: every fraction's subset holds
    every smaller fraction's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.init_args.fraction must lie in (0, 1], got {fraction}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: max(1, math.ceil(fraction * size))])


class LabelledFiles(Dataset):
    """The labelled images of one source (an image folder or a jsonl file; module docstring), each named
    ``{split}:{path}`` (unique across splits: the probes' feature cache key)."""

    def __init__(self, source: str, split: str, tile_size: int, class_names: list[str] | None,
                 image_root: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:  # fmt: skip
        path = Path(source)
        self.split, self.tile_size, self.max_pixels = split, tile_size, max_pixels
        if path.is_dir():
            classes = class_names or sorted(p.name for p in path.iterdir() if p.is_dir())
            self.items = [{"image": str(f), "label": label} for label, name in enumerate(classes)
                          for f in sorted((path / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
            self.class_names = classes
        elif path.is_file():
            root = Path(image_root) if image_root else path.parent
            self.items, self.class_names = [], list(class_names or [])
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    self.items.append(self._item(json.loads(line), root, f"{source}:{number}"))
        else:
            raise FileNotFoundError(f"no image folder or jsonl file at {source!r}")
        if not self.items:
            raise ValueError(f"{source!r} holds no labelled image")

    def _item(self, record: dict, root: Path, where: str) -> dict:
        if "image" not in record or ("label" not in record and "mask" not in record):
            raise ValueError(f"{where}: a labelled image is {{'image', 'label'}} or {{'image', 'mask'}}, got {record}")
        item = {"image": resolve_image_path(root, record["image"])}
        if "mask" in record:
            item["mask"] = resolve_image_path(root, record["mask"])
        if "label" in record:
            label = record["label"]
            if isinstance(label, str):
                if label not in self.class_names:
                    raise ValueError(f"{where}: label {label!r} is not a class name ({len(self.class_names)} known)")
                label = self.class_names.index(label)
            item["label"] = int(label)
        return item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        try:
            image = open_image(item["image"], self.max_pixels)
            mask = Image.open(item["mask"]) if "mask" in item else None
        except (UnusableImage, OSError) as error:
            raise ValueError(f"{item['image']}: {error}") from None
        sample = {"pixel_values": image_tensor(image, self.tile_size), "name": f"{self.split}:{item['image']}"}
        if mask is not None:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{item['mask']}: a mask is a one-channel image of class ids, got mode {mask.mode}")
            sample["mask"] = mask_tensor(mask, self.tile_size)
        if "label" in item:
            sample["label"] = item["label"]
        return sample


class ShapesLabelled(Dataset):
    """One split of the shapes world as labelled images: ``image``, one object of 30 classes (:meth:`pair`'s); or
    ``mask``, a scene of 1..``max_objects`` objects and its mask of ``mask_classes``."""

    def __init__(self, world: ShapesWorld, size: int, kind: str, max_objects: int, classes: MaskClasses) -> None:
        self.world, self.size, self.kind, self.max_objects, self.classes = world, size, kind, max_objects, classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        # The name says which picture this is, for the probes' feature cache too: another seed, kind or object count
        # draws other pictures under the same index.
        drawn = "object" if self.kind == "image" else f"scene of up to {self.max_objects}"
        name = f"shapes-{self.world.split}:{index} ({drawn}, seed {self.world.seed})"
        if self.kind == "image":
            pair = self.world.pair(index)
            return {"pixel_values": to_tensor(pair["image"]), "label": pair["label"], "name": name}
        scene = self.world.segmentation(index, self.max_objects, self.classes)
        mask = torch.from_numpy(np.asarray(scene["mask"], dtype=np.int64).copy())
        return {"pixel_values": to_tensor(scene["image"]), "mask": mask, "name": name}


class LabelledDataModule(L.LightningDataModule):
    """What the probes read: the ``image`` and ``mask`` views, a ``tile_size``, ``class_names``; subclasses say
    which views they offer and build each split's dataset (:meth:`dataset`)."""

    tokenizer = None  # the probes read no text
    prompt_templates = None
    question_types = None

    def __init__(
        self, tile_size: int, batch_size: int, num_workers: int, seed: int, fraction: float, subset_seed: int | None
    ) -> None:
        super().__init__()
        self.tile_size, self.batch_size, self.num_workers, self.seed, self.fraction = (
            tile_size, batch_size, num_workers, seed, fraction,
        )  # fmt: skip
        # The draw of the few-shot subset and of the training order; apart from `seed`, which also picks the shapes
        # world's pictures, so that repeats of a fraction (`probe --seeds`) share the pictures and their features.
        self.subset_seed = seed if subset_seed is None else subset_seed
        subset(1, fraction, seed)  # a fraction outside (0, 1] fails here, when the data is built
        self.views: tuple[View, ...] = ()

    def offered_views(self) -> frozenset[str]:
        raise NotImplementedError

    @property
    def source(self) -> str:
        return f"data {type(self).__name__}"

    def use_views(self, views: tuple[View, ...], stage: str = "the stage") -> None:
        check_offered(tuple(views), self.offered_views(), stage, self.source)
        self.views = tuple(views)

    def dataset(self, split: Split) -> Dataset | None:
        raise NotImplementedError

    def _loader(self, split: Split) -> DataLoader | list:
        dataset = self.dataset(split)
        if dataset is None:
            return []
        if not self.views:
            raise ValueError(f"{self.source}: no stage asked for its views (the probes ask for 'image' or 'mask')")
        view = self.views[0].name
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                       persistent_workers=self.num_workers > 0, collate_fn=partial(collate_images, view=view))  # fmt: skip
        if split == "train":
            if self.fraction < 1:
                dataset = torch.utils.data.Subset(dataset, subset(len(dataset), self.fraction, self.subset_seed))
            sampler = ResumableSampler(dataset, shuffle=True, seed=self.subset_seed, **replicas(self.trainer))
            return ResumableDataLoader(dataset, sampler, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


class ImagesDataModule(LabelledDataModule):
    """Labelled images from files (module docstring): ``train`` and ``val`` (and ``test``) each an image folder or a
    jsonl file.

    Args:
        train, val, test: the sources of each split (``val``, ``test`` optional).
        class_names: the classes (a list, or a file of one name a line; label = line number); default: an image
            folder's sub-folders, sorted; a jsonl file with int labels needs none. A mask's classes are its ids:
            name them here (0 first) for the tables.
        num_classes: the classes a mask may hold when ``class_names`` does not say (a segmentation probe's head).
        image_root: the folder a jsonl file's paths are relative to (default: the file's).
        tile_size, batch_size, num_workers, seed, fraction: module docstring; ``fraction`` of the training images.
        subset_seed: the seed of the ``fraction`` subset and of the training order (None: ``seed``).
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        class_names: str | list[str] | None = None,
        num_classes: int | None = None,
        image_root: str | None = None,
        tile_size: int = 448,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        fraction: float = 1.0,
        subset_seed: int | None = None,
    ) -> None:
        super().__init__(tile_size, batch_size, num_workers, seed, fraction, subset_seed)
        self.save_hyperparameters()
        if isinstance(class_names, str):
            class_names = [line.strip() for line in Path(class_names).read_text().splitlines() if line.strip()]
        train_path = Path(train)
        if class_names is None and train_path.is_dir():
            class_names = sorted(p.name for p in train_path.iterdir() if p.is_dir())
        self.class_names = class_names
        self.num_classes = len(class_names) if class_names else num_classes

    def offered_views(self) -> frozenset[str]:
        return frozenset({"image", "mask"})

    def dataset(self, split: Split) -> Dataset | None:
        source = getattr(self.hparams, split)
        if source is None:
            return None
        h = self.hparams
        return LabelledFiles(source, split, self.tile_size, self.class_names, h.image_root)


class ShapesImagesDataModule(LabelledDataModule):
    """The shapes world as labelled images (module docstring): ``records: objects`` gives the ``image`` view (one
    object a picture, its class one of the 30 colour × shape names), ``scenes`` the ``mask`` view (1..``max_objects``
    objects, every pixel its ``mask_classes`` class, 0 the background).

    Args:
        records: ``"objects"`` or ``"scenes"``.
        tile_size: the pictures' side in pixels (one tile each).
        train_size, val_size: pictures of the train split (before ``fraction``), and of the validation and test splits.
        mask_classes: ``"shape"`` (5 + background), ``"colour"`` (6 + background) or ``"object"`` (30 + background).
        batch_size, num_workers, seed, fraction, max_objects: loading, the world's seed, the few-shot fraction and the
            objects a scene holds at most.
        subset_seed: the seed of the ``fraction`` subset and of the training order (None: ``seed``); the pictures
            stay the world's of ``seed``.
    """

    def __init__(
        self,
        records: str = "objects",
        tile_size: int = 56,
        train_size: int = 2000,
        val_size: int = 500,
        mask_classes: MaskClasses = "shape",
        max_objects: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        fraction: float = 1.0,
        subset_seed: int | None = None,
    ) -> None:
        if records not in ("objects", "scenes"):
            raise ValueError(f"Unknown labelled shapes records {records!r}; choose 'objects' or 'scenes'")
        super().__init__(tile_size, batch_size, num_workers, seed, fraction, subset_seed)
        self.save_hyperparameters()
        if records == "objects":
            self.class_names = class_names()
        else:
            names = {"shape": list(SHAPES), "colour": list(COLOURS), "object": class_names()}[mask_classes]
            self.class_names = ["background", *names]
        self.num_classes = len(self.class_names)

    def offered_views(self) -> frozenset[str]:
        return frozenset({"image"} if self.hparams.records == "objects" else {"mask"})

    def dataset(self, split: Split) -> Dataset:
        h = self.hparams
        kind = "image" if h.records == "objects" else "mask"
        size = h.train_size if split == "train" else h.val_size
        return ShapesLabelled(ShapesWorld(h.tile_size, h.seed, split), size, kind, h.max_objects, h.mask_classes)
