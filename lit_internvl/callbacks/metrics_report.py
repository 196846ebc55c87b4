"""End-of-fit report: the final validation metrics as a table and as ``metrics.json``."""

from __future__ import annotations

import json
import os

import lightning as L


class MetricsReport(L.Callback):
    """At the end of ``fit``, print every ``val/`` metric with its chance level (from the stage's
    ``chance_levels``, where one exists) and write them to ``metrics.json`` in the run's log folder."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        if not metrics:
            return
        chance = getattr(pl_module, "chance_levels", {})
        report = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "metrics": {name: {"value": value, "chance": chance.get(name)} for name, value in metrics.items()},
        }
        log_dir = trainer.log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "metrics.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        width = max(len(name) for name in metrics)
        lines = [
            f"Final validation metrics (held-out split, step {trainer.global_step})",
            f"{'metric':<{width}}  {'value':>8}  {'chance':>8}",
        ]
        for name, value in metrics.items():
            level = chance.get(name)
            lines.append(f"{name:<{width}}  {value:>8.4f}  {'-' if level is None else f'{level:.4f}':>8}")
        lines.append(f"written to {path}")
        print("\n".join(lines), flush=True)
