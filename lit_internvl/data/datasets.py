"""Datasets of samples, read from jsonl/meta files directly or streamed from litdata shards.

Both wrap a :class:`~lit_internvl.data.samples.SampleBuilder`, which runs inside the loader
workers (decode, tile, template, tokenize), so the main process only collates.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from litdata import StreamingDataset
from torch.utils.data import Dataset

from lit_internvl.data.records import (
    REMOTE_PREFIXES,
    BadRecord,
    DatasetSpec,
    SkipCounter,
    check_chunks,
    decode_shard_item,
    index_records,
    read_meta,
    read_record,
)
from lit_internvl.data.samples import SampleBuilder


class Redrawn(Dataset):
    """``dataset`` where a record that cannot be built is replaced by the next one that can, for runs on several
    processes: every rank must train on every step there (Lightning refuses a skipped step in distributed training,
    and FSDP2's collectives need every rank's forward), and a batch of bad records only would be empty. InternVL's
    training dataset does the same (``internvl_chat_finetune.py``, ``LazySupervisedDataset.__getitem__``: on an error,
    another index). The replacement is the next good index after the bad one (up to ``tries`` of them), a fixed
    function of the index, so a resumed run draws the same; the bad record is still counted as skipped (the
    replacement carries it under ``"redrawn"``). Attributes (``source``, ``skips``, ``seed``) are the dataset's."""

    def __init__(self, dataset: Dataset, tries: int = 16) -> None:
        self.dataset, self.tries = dataset, tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a loader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if "skipped" not in sample:
            return sample
        size = len(self.dataset)
        for step in range(1, min(self.tries, size - 1) + 1):
            other = self.dataset[(index + step) % size]
            if "skipped" not in other:
                return {**other, "redrawn": [{"name": sample.get("name"), "reason": sample["skipped"]}]}
        return sample


def is_shards(source: str) -> bool:
    """An object-storage URL or a folder written by ``prepare`` (it holds ``index.json``)."""
    return source.startswith(REMOTE_PREFIXES) or (Path(source) / "index.json").is_file()


def dataset_specs(source: str, image_root: str | None = None, allow_absolute_paths: bool = False) -> list[DatasetSpec]:
    """A meta file's datasets, or one jsonl file (images under ``image_root``, else beside it).
    Image paths must stay inside each dataset's root; ``allow_absolute_paths`` also admits absolute ones."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"No jsonl, meta file or prepared shards at {source!r}")
    if path.suffix == ".json":
        specs = read_meta(path)
    else:
        specs = [DatasetSpec(path.stem, path, Path(image_root) if image_root else path.parent)]
    return [replace(spec, allow_absolute_paths=allow_absolute_paths) for spec in specs]


class JsonlSamples(Dataset):
    """Samples of jsonl files (or a meta file's datasets, ``repeat_time`` applied), read by byte
    offset: only the offsets live in memory. Lines bad in themselves (not UTF-8, not JSON, no
    record, an image path outside the root, nothing to train, a bad box) are skipped (counted in
    :attr:`skips`) when indexed, or raise with ``strict``; bad images are found when a sample is built."""

    def __init__(
        self, source: str, builder: SampleBuilder, image_root: str | None = None, allow_absolute_paths: bool = False
    ) -> None:
        self.builder = builder
        self.skips = SkipCounter()
        specs, strict = dataset_specs(source, image_root, allow_absolute_paths), builder.options.strict
        text = builder.max_text_bytes()
        # JSON may spell a character of text in up to 6 bytes (\u escapes); a line beyond that is over-long unread.
        line_limit = None if text is None else 6 * text + (1 << 16)
        self.items = [item for spec in specs for item in index_records(spec, strict, self.skips, "1000", line_limit)]
        # What a resumed run's saved position is a position in (ResumableDataLoader): the files and their sizes.
        self.source = ", ".join(f"{spec.annotation} ({spec.annotation.stat().st_size} bytes)" for spec in specs)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        try:
            record = read_record(self.items[index])
        except BadRecord as error:  # the file changed since it was indexed
            record = error
        return self.builder.safe(record)


class StreamingSamples(StreamingDataset):
    """Samples of litdata shards written by ``python -m lit_internvl prepare``, from a local folder
    or object storage (``storage_options`` reach the storage client, e.g. an ``endpoint_url``).
    Its loader's state (a ``StreamingDataLoader``) resumes the exact sample order."""

    def __init__(
        self,
        input_dir: str,
        builder: SampleBuilder,
        shuffle: bool = False,
        seed: int = 0,
        storage_options: dict | None = None,
    ) -> None:
        if not input_dir.startswith(REMOTE_PREFIXES):
            check_chunks(input_dir)
        super().__init__(input_dir, shuffle=shuffle, seed=seed, storage_options=storage_options or {})
        self.builder = builder

    def __getitem__(self, index) -> dict:
        try:
            record = decode_shard_item(self, index, super().__getitem__(index))
        except BadRecord as error:
            record = error
        return self.builder.safe(record)
