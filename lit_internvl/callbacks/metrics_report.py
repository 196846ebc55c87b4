"""End-of-fit report: the final validation metrics as a table and as ``metrics.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class MetricsReport(L.Callback):
    """At the end of ``fit``, print every ``val/`` metric with its chance level (from the stage's
    ``chance_levels``, where one exists) and write them to ``metrics.json`` in the run's log folder; at the end
    of ``test`` (``python -m lit_internvl test --config ... --ckpt_path ...``) the same for the ``test/`` metrics,
    to ``test_metrics.json``."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val", "metrics.json", "Final validation metrics (held-out split, ")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test", "test_metrics.json", "Test metrics (")

    @staticmethod
    def _report(trainer: L.Trainer, pl_module: L.LightningModule, split: str, filename: str, title: str) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: under DDP/FSDP log_dir is a broadcast
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{split}/")}
        if not metrics:
            return
        chance = getattr(pl_module, "chance_levels", {})
        report = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "metrics": {name: {"value": value, "chance": chance.get(name)} for name, value in metrics.items()},
        }
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, filename)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        width = max(len(name) for name in metrics)
        lines = [f"{title}step {trainer.global_step})", f"{'metric':<{width}}  {'value':>8}  {'chance':>8}"]
        for name, value in metrics.items():
            level = chance.get(name)
            lines.append(f"{name:<{width}}  {value:>8.4f}  {'-' if level is None else f'{level:.4f}':>8}")
        lines.append(f"written to {path}")
        print("\n".join(lines), flush=True)


def latest_report(run_dir: str) -> dict | None:
    """The newest ``metrics.json`` under a run folder (``runs/stage1`` → its last version)."""
    reports = sorted(Path(run_dir).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text()) if reports else None


def report_table(run_dirs: list[str]) -> str:
    """One table of every run's final held-out metrics (losses left out), with chance levels."""
    lines = [f"{'run':<16} {'metric':<44} {'value':>8} {'chance':>8}"]
    for run_dir in run_dirs:
        report = latest_report(run_dir)
        if report is None:
            lines.append(f"{run_dir:<16} (no metrics.json)")
            continue
        for name, entry in report["metrics"].items():
            if name.endswith("loss"):
                continue
            chance = "-" if entry["chance"] is None else f"{entry['chance']:.4f}"
            lines.append(f"{Path(run_dir).name:<16} {name:<44} {entry['value']:>8.4f} {chance:>8}")
    return "\n".join(lines)
