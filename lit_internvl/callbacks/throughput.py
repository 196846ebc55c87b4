"""Training throughput of vision-language batches: samples/s, tokens/s, MFU and peak memory."""

from __future__ import annotations

import resource
import sys
import warnings

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

from lit_internvl.batch import Views
from lit_internvl.flops import batch_flops, device_peak_flops


def count_samples(batch: Views) -> int:
    """Samples of a batch (its first view): the documents of packed rows (their names are joined by ``+``), else
    its rows."""
    if batch.empty:  # every sample of the batch was a skipped bad record
        return 0
    return sum(len(name.split("+")) for name in batch.first.sample_names)


def count_tokens(batch: Views) -> int:
    """Real tokens of a batch (its first view, as the samples and the FLOPs count it; padding excluded)."""
    return 0 if batch.empty else int(batch.first.attention_mask.sum())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated by torch on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class TrainingThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for lit_internvl's batches.

    Logs, every ``log_every_n_steps`` once ``window_size`` steps are in the window:
    ``train/device/samples_per_sec`` (documents, packed or not), ``train/device/items_per_sec`` (real
    tokens per second), ``train/device/flops_per_sec`` and ``train/device/mfu`` (the analytic model FLOPs
    of each batch from :mod:`lit_internvl.flops` over the device's dense peak at the trainer's precision, from the
    project's table :data:`~lit_internvl.flops.PEAK_TFLOPS`; ``available_flops`` sets one), the same without
    ``device/`` summed over ranks, and ``train/peak_memory_gib`` of rank 0.

    Args:
        window_size: steps the rates are averaged over.
        available_flops: peak FLOP/s of one device, when the table has no entry for it (e.g. a CPU).
    """

    def __init__(self, window_size: int = 20, available_flops: float | None = None, **kwargs) -> None:
        super().__init__(batch_size_fn=count_samples, length_fn=count_tokens, window_size=window_size, **kwargs)
        self.peak_flops = available_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():  # Lightning's "FLOPs not found for ..." is about the table replaced below
            warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        # Lightning's own table does not know "NVIDIA H200" and lists sparse peaks for some chips: ours replaces it.
        peak = self.peak_flops
        if peak is None:
            peak = device_peak_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        count = batch_flops(pl_module.model, batch) if isinstance(batch, Views) else None
        # ThroughputMonitor reads the module's ``flops_per_batch``: this batch's (packed lengths differ).
        pl_module.flops_per_batch = None if count is None else count.training
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        gib = peak_memory_bytes(trainer.strategy.root_device) / 2**30
        pl_module.log("train/peak_memory_gib", gib, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
