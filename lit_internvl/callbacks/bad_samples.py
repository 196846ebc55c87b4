"""The bad-sample report: every record the data path skipped, one JSON line each, with its reason."""

from __future__ import annotations

import json
import os

import lightning as L

from lit_internvl.batch import Views


def _scan_records(loader) -> list[dict]:
    """The records a loader's data set dropped when it indexed its files (malformed lines never reach a batch)."""
    skips = getattr(getattr(loader, "dataset", None), "skips", None)
    return list(getattr(skips, "records", []))


class BadSampleReport(L.Callback):
    """Writes ``skipped_samples.jsonl`` in the run's log folder (``output`` sets the file): one line per skipped
    record, ``{"split", "epoch", "step", "when", "name", "reason"}``, with ``name`` as the skip logs write it
    (``file:line``) and ``reason`` one of the README's skip reasons. ``when`` is ``scan`` for a line dropped
    when its file was indexed (written once, at the start of training or of the first validation), else
    ``batch`` (a sample that could not be built or packed, from the batch's ``skipped_records``). Training and
    validation batches are both reported (not the sanity check's); each rank past 0 writes its own file."""

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self.path: str | None = None
        self._scanned: set[str] = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        folder = trainer.log_dir or trainer.default_root_dir
        name = (
            "skipped_samples.jsonl" if trainer.global_rank == 0 else f"skipped_samples.rank{trainer.global_rank}.jsonl"
        )
        self.path = self.output or os.path.join(folder, name)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        open(self.path, "w").close()
        self._scanned.clear()

    def _write(self, trainer, split: str, when: str, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a") as f:
            for record in records:
                line = {"split": split, "epoch": trainer.current_epoch, "step": trainer.global_step, "when": when}
                f.write(json.dumps({**line, "name": record["name"], "reason": record["reason"]}) + "\n")

    def _write_scan(self, trainer, split: str, loaders) -> None:
        if split in self._scanned:
            return
        self._scanned.add(split)
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            self._write(trainer, split, "scan", _scan_records(loader))

    def on_train_start(self, trainer, pl_module) -> None:
        self._write_scan(trainer, "train", trainer.train_dataloader)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write_scan(trainer, "val", trainer.val_dataloaders)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, Views):
            self._write(trainer, "train", "batch", batch.skipped_records)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if isinstance(batch, Views) and not trainer.sanity_checking:
            self._write(trainer, "val", "batch", batch.skipped_records)
