"""Measurement: latency, size, MACs, memory and output quality of models, side by side.

`measure_models` is the one entry point the pipeline runner calls; `quality` owns the one output
flattener and fidelity every engine reuses (quantization's min_fidelity, distillation's validation).
"""

from worker.engines.measure.latency import BenchmarkConfig
from worker.engines.measure.macs import MacCount, count_macs
from worker.engines.measure.measure import Measurement, measure_models
from worker.engines.measure.quality import FidelityAccumulator, fidelity, top1_accuracy
from worker.engines.measure.size import file_size, weight_stats

__all__ = [
    "BenchmarkConfig",
    "FidelityAccumulator",
    "MacCount",
    "Measurement",
    "count_macs",
    "fidelity",
    "file_size",
    "measure_models",
    "top1_accuracy",
    "weight_stats",
]
