"""RecordsDataModule: training data from records in jsonl files, InternVL meta files or litdata shards."""

from __future__ import annotations

from dataclasses import replace

from torch.utils.data import DataLoader

from lit_internvl.data.collate import Collator
from lit_internvl.data.datasets import JsonlSamples, StreamingSamples, is_shards
from lit_internvl.data.resumable import ResumableDataLoader, ResumableSampler, ResumableStreamingDataLoader, replicas
from lit_internvl.data.samples import SampleBuilder, SampleDataModule, SampleOptions
from lit_internvl.data.templates import ChatTemplate, TemplateName
from lit_internvl.data.tokenizer import load_tokenizer


class RecordsDataModule(SampleDataModule):
    """Vision-language training data from records: a jsonl file, an InternVL meta file, or litdata
    shards written by ``python -m lit_internvl prepare`` (a folder or an ``s3://`` URL).

    Shards stream through litdata's ``StreamingDataLoader`` and jsonl records through a seeded
    sampler; both loaders' states are saved in Lightning checkpoints (:mod:`lit_internvl.data.resumable`):
    a resumed run reads exactly the samples an uninterrupted run would have read next. Bad
    records are skipped and counted (``data/skipped`` each epoch) unless ``strict``.

    Args:
        train, val: data sources (``val`` optional).
        image_root: folder a jsonl file's image paths are relative to (default: the file's folder).
        tokenizer: ``"byte"``, ``"shapes"`` (bytes and the shapes world's words) or a local Hugging Face
            tokenizer folder.
        add_tokens: special tokens to add to the tokenizer; a vision-language stage grows its decoder's
            embeddings and head for them (:mod:`lit_internvl.models.vocabulary`).
        tokens_per_tile, template, tile_size, min_tiles, max_tiles, use_thumbnail, max_length, system,
            pair_prompt, jpeg_quality, strict, seed: the :class:`~lit_internvl.data.samples.SampleOptions`
            of every sample (``jpeg_quality`` augments training samples only); ``tokens_per_tile`` must
            equal the model's.
        pack: pack samples into rows of at most ``max_tokens`` tokens and ``max_tiles_per_row`` tiles.
        batch_size, num_workers, shuffle: loading (``shuffle``: training data only, seeded by ``seed``).
        storage_options: passed to the object-storage client (e.g. ``{"endpoint_url": ...}``).
    """

    class_names = prompt_template = question_types = None  # no zero-shot classes, no question types

    def __init__(
        self,
        train: str,
        val: str | None = None,
        image_root: str | None = None,
        tokenizer: str = "byte",
        add_tokens: list[str] | None = None,
        template: TemplateName | ChatTemplate = "internvl2_5",
        tokens_per_tile: int = 256,
        tile_size: int = 448,
        min_tiles: int = 1,
        max_tiles: int = 12,
        use_thumbnail: bool = True,
        max_length: int = 4096,
        system: str | None = None,
        pair_prompt: str = "",
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
            raise ValueError(
                f"max_length {max_length} exceeds max_tokens {max_tokens}: a packed row could not hold a sample"
            )
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer, add_tokens or ())
        self.sample_options = SampleOptions(
            tokens_per_tile=tokens_per_tile, template=template, tile_size=tile_size, min_tiles=min_tiles,
            max_tiles=max_tiles, use_thumbnail=use_thumbnail, max_length=max_length, system=system,
            pair_prompt=pair_prompt, jpeg_quality=jpeg_quality, strict=strict, seed=seed,
        )  # fmt: skip

    def sample_builder(self, train: bool = False, generation: bool = False) -> SampleBuilder:
        """How this datamodule turns records into samples (``generation``: prompts to answer); only
        training samples are augmented."""
        options = self.sample_options if train else replace(self.sample_options, jpeg_quality=None)
        return SampleBuilder(self.tokenizer, options, generation)

    def collator(self) -> Collator:
        h = self.hparams
        return Collator(self.tokenizer.pad_id, h.pack, h.max_tokens, h.max_tiles_per_row)

    def _loader(self, source: str, train: bool):
        h = self.hparams
        shuffle = h.shuffle and train
        if is_shards(source):
            dataset = StreamingSamples(
                source, self.sample_builder(train), shuffle=shuffle, seed=h.seed, storage_options=h.storage_options
            )
            return ResumableStreamingDataLoader(
                dataset, batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=self.collator()
            )
        dataset = JsonlSamples(source, self.sample_builder(train), h.image_root)
        options = dict(
            batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=self.collator(),
            persistent_workers=h.num_workers > 0,
        )  # fmt: skip
        if train:  # a seeded order that a resumed run continues mid-epoch
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=h.seed, **replicas(self.trainer))
            return ResumableDataLoader(dataset, sampler, **options)
        return DataLoader(dataset, shuffle=False, **options)

    def train_dataloader(self):
        return self._loader(self.hparams.train, train=True)

    def val_dataloader(self):
        return self._loader(self.hparams.val, train=False) if self.hparams.val else []
