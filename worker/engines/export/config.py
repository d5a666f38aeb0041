"""The formats a job's artifact is offered in: the JobSpec's `output_formats`, on the engines' side."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engines.errors import EngineError
from worker.engines.step_config import setting

OUTPUT_FORMATS = ("torchscript", "onnx")


@dataclass(frozen=True)
class ExportConfig:
    """Which artifacts a job makes. TorchScript always: it is the artifact the report measures.

    Example:
        ExportConfig.from_spec({"output_formats": ["torchscript", "onnx"]}).onnx  # True
    """

    output_formats: tuple[str, ...] = setting(("torchscript",), choices=OUTPUT_FORMATS)

    def __post_init__(self) -> None:
        unknown = [f for f in self.output_formats if f not in OUTPUT_FORMATS]
        if unknown:
            raise EngineError("invalid_spec", f"output_formats: unknown format(s) {', '.join(map(str, unknown))}")
        if "torchscript" not in self.output_formats or len(set(self.output_formats)) != len(self.output_formats):
            raise EngineError("invalid_spec", "output_formats must list each format once, with 'torchscript'")

    @classmethod
    def from_spec(cls, spec: dict) -> ExportConfig:
        return cls(tuple(spec.get("output_formats") or ("torchscript",)))

    @property
    def onnx(self) -> bool:
        return "onnx" in self.output_formats
