"""Writes what ``predict`` returns (lists of dicts) to ``predictions.jsonl`` in the run's log folder."""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionsWriter(BasePredictionWriter):
    """One JSON object per line, in batch order, written as batches finish (``output`` sets the
    file; default ``<log_dir>/predictions.jsonl``). Each rank writes its own file past rank 0."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.path: str | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        folder = trainer.log_dir or trainer.default_root_dir
        name = "predictions.jsonl" if trainer.global_rank == 0 else f"predictions.rank{trainer.global_rank}.jsonl"
        self.path = self.output or os.path.join(folder, name)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        open(self.path, "w").close()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        with open(self.path, "a") as f:
            for item in prediction:
                f.write(json.dumps(item) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"predictions written to {self.path}", flush=True)
