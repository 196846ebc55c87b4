"""Counts the samples the data path skipped (bad records), logs them every epoch, and stops a run that trains on
nothing (or on too little of its data) before it writes a checkpoint."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch
import torch.distributed as dist

from lit_internvl.batch import Views
from lit_internvl.distributed import world

log = logging.getLogger(__name__)


DEFAULT_MAX_SKIPPED = 0.5  # a datamodule without ``max_skipped`` of its own
JUDGED_FROM = 32  # records seen (all ranks) before the skipped fraction is judged mid-epoch


class TooManySkipped(RuntimeError):
    """A run whose records are (nearly) all bad: a typo in ``image_root``, a ``max_length`` nothing fits."""


class SkippedSamples(L.Callback):
    """Sums each batch's ``skipped`` counts (by reason, from the collator) over an epoch, plus in the
    first epoch the lines dropped when the dataset was indexed; logs
    ``data/skipped`` and ``data/skipped/<reason>`` and warns with the breakdown at the epoch's end.

    A run that trained on no record, or skipped more than the data's ``max_skipped`` fraction of the records it saw
    (judged after each batch once ``JUDGED_FROM`` records were seen, at each epoch's end and at the run's, and
    whenever a checkpoint is about to be written), stops with a :class:`TooManySkipped` error naming the reasons and
    some records, before a checkpoint that the next stage would start from is written."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.run_counts: Counter = Counter()  # every epoch's, for the judgement
        self.examples: list[dict] = []
        self.trained = 0
        self.judging = False  # only runs whose batches say what they skipped (Views) are judged

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, Views):
            self.judging = True
            self.counts.update(batch.skipped)
            self.run_counts.update(batch.skipped)
            self.examples = (self.examples + batch.skipped_records)[:3]
            if not batch.empty:
                names = getattr(batch.first, "sample_names", None) or [""] * int(getattr(batch.first, "rows", 1))
                self.trained += sum(len(name.split("+")) for name in names)
        self._judge(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._judge(trainer, pl_module, final=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Called on every rank before the file is written: never a checkpoint of a model that trained on no record.
        if trainer.training:
            self._judge(trainer, pl_module, saving=True)

    def _judge(self, trainer, pl_module, final: bool = False, saving: bool = False) -> None:
        scan = _scan_skips(trainer)
        if not (self.judging or scan):
            return
        counts = torch.tensor([self.trained, sum(self.run_counts.values()) + sum(scan.values())], dtype=torch.float64)
        if world()[1] > 1:
            counts = counts.to(pl_module.device)
            dist.all_reduce(counts)
        trained, skipped = (int(c) for c in counts.tolist())
        seen, enough = trained + skipped, final or trained + skipped >= JUDGED_FROM
        limit = float(getattr(trainer.datamodule, "max_skipped", DEFAULT_MAX_SKIPPED))
        if trained and (not enough or skipped <= limit * seen):
            return
        if not trained and not (enough or saving):
            return
        reasons = dict(self.run_counts + Counter(scan))
        examples = "; ".join(f"{r['name']} ({r['reason']})" for r in self.examples) or "none reached a batch"
        what = "no record trained" if not trained else f"more than data.init_args.max_skipped {limit} of them"
        raise TooManySkipped(
            f"Stopped before writing a checkpoint: {skipped} of the {seen} records seen were skipped as bad, "
            f"{what} (reasons: {reasons}; e.g. {examples}). Check the data's paths (data.init_args.image_root) and "
            "limits (max_length, max_image_pixels); the log names every record skipped."
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._judge(trainer, pl_module, final=True)
        counts = Counter(self.counts)
        # Records dropped while a jsonl file was indexed (malformed lines) never reach a batch.
        scan_skips = _scan_skips(trainer)
        if scan_skips and trainer.current_epoch == 0:
            counts.update(scan_skips)
        _, world_size = world()
        if world_size > 1:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, counts)
            counts = sum(gathered, Counter())
        pl_module.log("data/skipped", float(sum(counts.values())), rank_zero_only=True)
        for reason, count in counts.items():
            pl_module.log(f"data/skipped/{reason.replace(' ', '_')}", float(count), rank_zero_only=True)
        if counts and trainer.is_global_zero:
            log.warning(
                "epoch %d: skipped %d bad sample(s): %s", trainer.current_epoch, sum(counts.values()), dict(counts)
            )
        self.counts.clear()


def _scan_skips(trainer) -> Counter:
    """Records dropped while the train set was indexed (malformed lines), by reason."""
    skips = getattr(getattr(trainer.train_dataloader, "dataset", None), "skips", None)
    return Counter(skips.counts) if skips is not None else Counter()
