"""Lightning callbacks (YAML presets that use them live in the top-level callbacks/ folder)."""

from lit_internvl.callbacks.bad_samples import BadSampleReport
from lit_internvl.callbacks.export import ExportAtFitEnd
from lit_internvl.callbacks.freeze import FreezeSchedule
from lit_internvl.callbacks.metrics_report import MetricsReport
from lit_internvl.callbacks.samples import SampleLogger

__all__ = ["BadSampleReport", "ExportAtFitEnd", "FreezeSchedule", "MetricsReport", "SampleLogger"]
