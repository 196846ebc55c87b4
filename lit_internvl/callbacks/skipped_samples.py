"""Counts the samples the data path skipped (bad records) and logs them every epoch."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch.distributed as dist

from lit_internvl.batch import Views
from lit_internvl.distributed import world

log = logging.getLogger(__name__)


class SkippedSamples(L.Callback):
    """Sums each batch's ``skipped`` counts (by reason, from the collator) over an epoch, plus in the
    first epoch the lines dropped when the dataset was indexed; logs
    ``data/skipped`` and ``data/skipped/<reason>`` and warns with the breakdown at the epoch's end."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, Views):
            self.counts.update(batch.skipped)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        counts = Counter(self.counts)
        # Records dropped while a jsonl file was indexed (malformed lines) never reach a batch.
        scan_skips = getattr(getattr(trainer.train_dataloader, "dataset", None), "skips", None)
        if scan_skips is not None and trainer.current_epoch == 0:
            counts.update(scan_skips.counts)
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
