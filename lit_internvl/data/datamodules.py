"""DataModules of the embedded default, built on the generated shapes world."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_internvl.data.images import to_tensor
from lit_internvl.data.shapes import ShapesWorld, class_names
from lit_internvl.data.tokenizer import ByteTokenizer


class ShapesPairs(Dataset):
    """Image–caption pairs of one split: ``{pixel_values (3, H, W), input_ids, label, caption_key}``."""

    def __init__(self, world: ShapesWorld, size: int, tokenizer: ByteTokenizer) -> None:
        self.world, self.size, self.tokenizer = world, size, tokenizer

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
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


class ShapesDataModule(L.LightningDataModule):
    """Generated shapes data for the embedded-default recipes.

    ``task``: ``"pairs"`` (image + caption, stage 1). Train, validation and test splits are
    different seeds of the same world, so held-out scenes are never seen in training.
    Zero-shot classification uses :attr:`class_names` through :attr:`prompt_template`.
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
    ) -> None:
        super().__init__()
        if task != "pairs":
            raise ValueError(f"Unknown shapes task {task!r}; available: 'pairs'")
        self.save_hyperparameters()
        self.tokenizer = ByteTokenizer()
        self.class_names = class_names()
        self.prompt_template = prompt_template

    def _dataset(self, split: str, size: int) -> ShapesPairs:
        world = ShapesWorld(self.hparams.image_size, self.hparams.seed, split)
        return ShapesPairs(world, size, self.tokenizer)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,  # every rank gathers equal-sized batches for the contrastive loss
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=PairCollator(self.tokenizer.pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", self.hparams.train_size), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.hparams.val_size), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", self.hparams.val_size), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
