"""Artifacts in other formats than TorchScript: today ONNX, exported, quantized and validated here.

Everything in this package loads and runs what the uploaded model became, so it runs only inside a
job's sandboxed child (worker/runner.py), never in the worker's parent or the API.
"""

from worker.engines.export.config import OUTPUT_FORMATS, ExportConfig
from worker.engines.export.onnx_artifact import OnnxUnavailable, build_onnx_artifact, export_onnx

__all__ = ["OUTPUT_FORMATS", "ExportConfig", "OnnxUnavailable", "build_onnx_artifact", "export_onnx"]
