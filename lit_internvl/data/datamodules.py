"""DataModules: the generated shapes world of the embedded default, and records from files or shards."""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_internvl.data.datasets import JsonlSamples, StreamingSamples, is_shards
from lit_internvl.data.images import to_tensor
from lit_internvl.data.packing import Collator
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.records import Record
from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler, ResumableStreamingDataLoader, replicas
from lit_internvl.data.shapes import QUESTION_TYPES, ShapesWorld, class_names, vocabulary
from lit_internvl.data.tokenizer import ByteTokenizer


class ShapesSplit(Dataset, ABC):
    """``size`` samples generated from one split of the world; :meth:`sample` builds sample ``index``.
    Indices past the end raise IndexError, so that ``for sample in dataset`` ends."""

    def __init__(self, world: ShapesWorld, size: int) -> None:
        self.world, self.size = world, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside this {self.world.split} split of {self.size} samples")
        return self.sample(index)

    @abstractmethod
    def sample(self, index: int) -> dict:
        """Sample ``index`` of the split (``0 <= index < size``)."""


class ShapesPairs(ShapesSplit):
    """Image–caption pairs of one split: ``{pixel_values (3, H, W), input_ids, label, caption_key}``."""

    def __init__(self, world: ShapesWorld, size: int, tokenizer: ByteTokenizer) -> None:
        super().__init__(world, size)
        self.tokenizer = tokenizer

    def sample(self, index: int) -> dict:
        pair = self.world.pair(index)
        return {
            "pixel_values": to_tensor(pair["image"]),
            "input_ids": torch.tensor(self.tokenizer.encode(pair["text"])),
            "label": pair["label"],
            "caption_key": pair["caption_key"],
        }


def pad_ids(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors → ``input_ids (B, T)`` and ``attention_mask (B, T)`` (1 = real token)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


class PairCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        input_ids, attention_mask = pad_ids([s["input_ids"] for s in samples], self.pad_id)
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "label": torch.tensor([s["label"] for s in samples]),
            "caption_key": torch.tensor([s["caption_key"] for s in samples]),
        }


class ShapesVQA(ShapesSplit):
    """Questions about generated scenes, as conversation records built into samples by a
    :class:`SampleBuilder` (the same path real data takes). ``meta`` holds the question type and answer."""

    def __init__(
        self, world: ShapesWorld, size: int, builder: SampleBuilder, max_objects: int, describe_ratio: float = 0.0
    ) -> None:
        super().__init__(world, size)
        self.builder, self.max_objects, self.describe_ratio = builder, max_objects, describe_ratio

    def sample(self, index: int) -> dict:
        qa = self.world.vqa(index, self.max_objects, self.describe_ratio)
        turns = [{"from": "human", "value": f"<image>\n{qa['question']}"}, {"from": "gpt", "value": qa["answer"]}]
        fields = {"conversations": turns, "meta": {"type": qa["type"], "answer": qa["answer"]}}
        name = f"shapes-{self.world.split}:{index}"
        return self.builder.safe(Record("conversation", name, fields, [qa["image"]]))


class ShapesPreference(ShapesSplit):
    """Preference pairs about generated scenes: the right one-word answer (chosen) and a wrong one
    of the same question type (rejected), as preference records built by a :class:`SampleBuilder`."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder) -> None:
        super().__init__(world, size)
        self.builder = builder

    def sample(self, index: int) -> dict:
        pair = self.world.preference(index)
        fields = {"question": f"<image>\n{pair['question']}", "chosen": pair["chosen"], "rejected": pair["rejected"],
                  "meta": {"type": pair["type"], "answer": pair["chosen"]}}  # fmt: skip
        return self.builder.safe(Record("preference", f"shapes-{self.world.split}:{index}", fields, [pair["image"]]))


class ShapesDataModule(L.LightningDataModule):
    """Generated shapes data for the embedded-default recipes.

    Tasks:

    - ``"pairs"``: image + caption (stage 1, stage 2). Zero-shot classification uses
      :attr:`class_names` through :attr:`prompt_template`.
    - ``"vqa"``: one-word questions about scenes of 1..``max_objects`` objects, in the
      ``internvl2_5`` chat template (SFT); :attr:`question_types` gives each type's chance level.
    - ``"preference"``: the same questions with a chosen (right) and a rejected (wrong) answer (MPO).

    Train, validation and test splits are different seeds of the same world, so held-out scenes
    are never seen in training. ``predict`` reads the test split; for ``vqa`` as prompts to answer.

    ``describe_ratio``: the fraction of *training* ``vqa`` samples that ask "Describe the objects by
    shape." (or "by colour.") and are answered with every object and its region in that order (as the
    captioning data in InternVL's SFT mixtures: one answer supervises every object, not one);
    validation and test ask only the one-word questions.

    ``tokenizer``: ``"byte"`` or ``"shapes"``, which makes every word the world writes one token (a
    question and its answer take a third of the tokens); the model's vocabulary must hold its ids.
    """

    def __init__(
        self,
        task: str = "pairs",
        image_size: int = 56,
        train_size: int = 10_000,
        val_size: int = 1_000,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        prompt_template: str = "a {}",
        tokens_per_tile: int = 4,
        max_objects: int = 3,
        system: str | None = None,
        describe_ratio: float = 0.0,
        tokenizer: str = "byte",
    ) -> None:
        super().__init__()
        if task not in ("pairs", "vqa", "preference"):
            raise ValueError(f"Unknown shapes task {task!r}; available: 'pairs', 'vqa', 'preference'")
        if not 0.0 <= describe_ratio <= 1.0:
            raise ValueError(f"describe_ratio must lie in [0, 1], got {describe_ratio}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.class_names = class_names()
        self.prompt_template = prompt_template
        world = ShapesWorld(image_size)
        self.question_types = {kind: 1 / len(world.answer_options(kind, max_objects)) for kind in QUESTION_TYPES}

    def sample_builder(self, train: bool = False, generation: bool = False) -> SampleBuilder:
        """How this datamodule turns records into samples (``generation``: prompts to answer)."""
        h = self.hparams
        return SampleBuilder(
            self.tokenizer, h.tokens_per_tile, tile_size=h.image_size, max_tiles=1, use_thumbnail=False,
            max_length=1024, system=h.system, strict=True, generation=generation,
        )  # fmt: skip

    def _dataset(self, split: str, size: int, generation: bool = False) -> Dataset:
        h = self.hparams
        world = ShapesWorld(h.image_size, h.seed, split)
        if h.task == "pairs":
            return ShapesPairs(world, size, self.tokenizer)
        if h.task == "preference":
            return ShapesPreference(world, size, self.sample_builder(split == "train"))
        describe = h.describe_ratio if split == "train" else 0.0
        return ShapesVQA(world, size, self.sample_builder(split == "train", generation), h.max_objects, describe)

    def _loader(self, dataset: Dataset, shuffle: bool, generation: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        if self.hparams.task == "pairs":
            collate = PairCollator(self.tokenizer.pad_id)
        else:
            collate = Collator(self.tokenizer.pad_id, left_pad=generation)
        options = dict(
            batch_size=self.hparams.batch_size, num_workers=workers, persistent_workers=workers > 0, collate_fn=collate
        )
        if shuffle:  # training: a seeded order that a resumed run continues mid-epoch
            sampler = ResumableSampler(dataset, shuffle=True, seed=self.hparams.seed, **replicas(self.trainer))
            # drop_last: every rank gathers equal-sized batches for the contrastive loss
            return ResumableDataLoader(dataset, sampler, drop_last=True, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", self.hparams.train_size), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.hparams.val_size), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", self.hparams.val_size), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        generation = self.hparams.task == "vqa"
        return self._loader(self._dataset("test", self.hparams.val_size, generation), shuffle=False, generation=generation)


class RecordsDataModule(L.LightningDataModule):
    """Vision-language training data from records: a jsonl file, an InternVL meta file, or litdata
    shards written by ``python -m lit_internvl prepare`` (a folder or an ``s3://`` URL).

    Shards stream through litdata's ``StreamingDataLoader`` and jsonl records through a seeded
    sampler; both loaders' states are saved in Lightning checkpoints (:mod:`lit_internvl.data.resumable`):
    a resumed run reads exactly the samples an uninterrupted run would have read next. Bad
    records are skipped and counted (``data/skipped`` each epoch) unless ``strict``.

    Args:
        train, val: data sources (``val`` optional).
        tokenizer: ``"byte"``, ``"shapes"`` (bytes and the shapes world's words) or a local Hugging Face
            tokenizer folder.
        tokens_per_tile: ``<IMG_CONTEXT>`` tokens per tile; must equal the model's.
        pack: pack samples into rows of at most ``max_tokens`` tokens and ``max_tiles_per_row`` tiles.
        storage_options: passed to the object-storage client (e.g. ``{"endpoint_url": ...}``).
        Tiling and template options: see :class:`~lit_internvl.data.samples.SampleBuilder`.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        image_root: str | None = None,
        tokenizer: str = "byte",
        template: str = "internvl2_5",
        tokens_per_tile: int = 256,
        tile_size: int = 448,
        min_tiles: int = 1,
        max_tiles: int = 12,
        use_thumbnail: bool = True,
        max_length: int = 4096,
        pack: bool = False,
        max_tokens: int = 8192,
        max_tiles_per_row: int = 64,
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        strict: bool = False,
        jpeg_quality: tuple[int, int] | None = None,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        if pack and max_length > max_tokens:
            raise ValueError(f"max_length {max_length} exceeds max_tokens {max_tokens}: a packed row could not hold a sample")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)

    def sample_builder(self, train: bool = False, generation: bool = False) -> SampleBuilder:
        """How this datamodule turns records into samples (``generation``: prompts to answer)."""
        h = self.hparams
        return SampleBuilder(
            self.tokenizer, h.tokens_per_tile, h.template, h.tile_size, h.min_tiles, h.max_tiles, h.use_thumbnail,
            h.max_length, pair_prompt="", jpeg_quality=h.jpeg_quality if train else None, strict=h.strict, seed=h.seed,
            generation=generation,
        )  # fmt: skip

    def collator(self) -> Collator:
        h = self.hparams
        return Collator(self.tokenizer.pad_id, h.pack, h.max_tokens, h.max_tiles_per_row)

    def _loader(self, source: str, train: bool):
        h = self.hparams
        shuffle = h.shuffle and train
        if is_shards(source):
            dataset = StreamingSamples(source, self.sample_builder(train), shuffle=shuffle, seed=h.seed, storage_options=h.storage_options)
            return ResumableStreamingDataLoader(dataset, batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=self.collator())
        dataset = JsonlSamples(source, self.sample_builder(train), h.image_root)
        options = dict(batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=self.collator(), persistent_workers=h.num_workers > 0)
        if train:  # a seeded order that a resumed run continues mid-epoch
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=h.seed, **replicas(self.trainer))
            return ResumableDataLoader(dataset, sampler, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self):
        return self._loader(self.hparams.train, train=True)

    def val_dataloader(self):
        return self._loader(self.hparams.val, train=False) if self.hparams.val else []


def load_tokenizer(name: str):
    """``"byte"`` → :class:`ByteTokenizer`; ``"shapes"`` → bytes and the shapes world's words
    (:func:`~lit_internvl.data.shapes.vocabulary`); a folder → its Hugging Face tokenizer (no remote code)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "shapes":
        return ByteTokenizer(vocabulary())
    from lit_internvl.data.tokenizer import HFTokenizer

    return HFTokenizer(name)
