"""Serving modes: the ways the meter runs a model, as a user would serve it.

`plain` is the module as `torch.jit.load` gives it; `optimized` applies
`torch.jit.optimize_for_inference` after loading (its result cannot be saved, so it is a load-time
step, not an artifact); `onnxruntime` runs the model's ONNX file on ONNX Runtime's CPU execution
provider with the meter's threads. A mode that cannot run a model raises `ServingUnavailable` with
the reason, which the report shows in place of that mode's figures.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from worker.engines.errors import model_text
from worker.engines.measure.quality import FLOAT_TOLERANCE, flatten_outputs

Call = Callable[[], object]


class ServingUnavailable(Exception):
    """A serving mode cannot run a model; `reason` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ServedModel:
    """One model as the meter received it: the loaded module and the files it came with."""

    module: torch.jit.ScriptModule
    torchscript: Path | None = None
    onnx: Path | None = None


class Runner(abc.ABC):
    """A model made ready to serve in one mode."""

    @abc.abstractmethod
    def bind(self, inputs: tuple[torch.Tensor, ...]) -> Call:
        """A zero-argument call running one inference on `inputs`, converted beforehand so that
        the timed call is the inference alone."""

    @abc.abstractmethod
    def outputs(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The output tensors of one inference, in `output_leaves` order."""


class ServingMode(abc.ABC):
    """How a model is served; `load` raises `ServingUnavailable` where the mode cannot run it."""

    name: ClassVar[str]

    @abc.abstractmethod
    def load(self, model: ServedModel, device: torch.device) -> Runner: ...

    def describe(self) -> dict[str, Any]:
        """What the report's environment says about the mode's runtime."""
        return {}


class _TorchRunner(Runner):
    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module

    def bind(self, inputs: tuple[torch.Tensor, ...]) -> Call:
        return lambda: self.module(*inputs)

    def outputs(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return flatten_outputs(self.module(*inputs))


class PlainServing(ServingMode):
    """The module exactly as `torch.jit.load` returns it: what every speed-up divides by."""

    name = "plain"

    def load(self, model: ServedModel, device: torch.device) -> Runner:
        return _TorchRunner(model.module)


class OptimizedServing(ServingMode):
    """`torch.jit.optimize_for_inference(torch.jit.load(file))`: freezing plus the rewrites (MKL-DNN
    layouts on CPU, fused conv-BN) whose graph cannot be saved again."""

    name = "optimized"

    def load(self, model: ServedModel, device: torch.device) -> Runner:
        if model.torchscript is None:
            raise ServingUnavailable("no TorchScript file of this model to load")
        # a fresh copy from the file: the passes rewrite a frozen module in place, and the module
        # the other modes time must stay as loaded
        try:
            loaded = torch.jit.load(str(model.torchscript), map_location=device).eval()
            optimized = torch.jit.optimize_for_inference(loaded)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 (torch raises many kinds; each is a reason the same way)
            raise ServingUnavailable(f"optimize_for_inference failed on this model: {model_text(exc)}") from None
        return _TorchRunner(optimized)


class _OrtRunner(Runner):
    def __init__(self, session: Any):
        self.session = session
        self.names = [node.name for node in session.get_inputs()]

    def _feeds(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        if len(inputs) != len(self.names):
            raise ServingUnavailable(
                f"the ONNX file takes {len(self.names)} inputs, the model {len(inputs)}: it is not this model's export"
            )
        try:
            return {name: tensor.detach().cpu().numpy() for name, tensor in zip(self.names, inputs)}
        except TypeError as exc:  # bfloat16 and other dtypes numpy has no type for
            raise ServingUnavailable(f"ONNX Runtime cannot be fed these inputs: {exc}") from None

    def bind(self, inputs: tuple[torch.Tensor, ...]) -> Call:
        feeds = self._feeds(inputs)
        return lambda: self.session.run(None, feeds)

    def outputs(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [torch.from_numpy(array) for array in self.session.run(None, self._feeds(inputs))]


class OnnxRuntimeServing(ServingMode):
    """The model's ONNX file on ONNX Runtime's CPU execution provider, all graph optimisations on,
    with as many intra-op threads as torch has while measuring and one inter-op thread."""

    name = "onnxruntime"

    def load(self, model: ServedModel, device: torch.device) -> Runner:
        if device.type != "cpu":
            raise ServingUnavailable(
                f"ONNX Runtime is measured on its CPU execution provider, and this job is benchmarked on {device.type}"
            )
        if model.onnx is None:
            raise ServingUnavailable("no ONNX file of this model was made in this job")
        try:
            import onnxruntime
        except ImportError:
            raise ServingUnavailable("onnxruntime is not installed on this worker") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ORT's pool threads spin after each run by default: that CPU would be taken from
        # whichever model the interleaved rounds time next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(
                str(model.onnx), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 (ORT's own exception types; each is a reason the same way)
            raise ServingUnavailable(f"ONNX Runtime could not load the ONNX file: {model_text(exc)}") from None
        return _OrtRunner(session)

    def describe(self) -> dict[str, Any]:
        try:
            import onnxruntime
        except ImportError:
            return {}
        return {"onnxruntime": onnxruntime.__version__}


SERVING_MODES: dict[str, ServingMode] = {
    mode.name: mode for mode in (PlainServing(), OptimizedServing(), OnnxRuntimeServing())
}


def serve(mode: str, model: ServedModel, device: torch.device) -> Runner:
    """`model` made ready to serve in `mode` (one of `SERVING_MODES`).

    Raises:
        ServingUnavailable: the mode cannot run this model (the reason says why).

    Example:
        runner = serve("optimized", ServedModel(module, Path("model.pt")), torch.device("cpu"))
        call = runner.bind((x,))
    """
    return SERVING_MODES[mode].load(model, device)


def run_checked(what: str, function: Callable[[], Any]) -> Any:
    """`function()`, where an exception of the model's (or runtime's) becomes `ServingUnavailable`."""
    try:
        return function()
    except (MemoryError, torch.OutOfMemoryError, ServingUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001
        raise ServingUnavailable(f"{what}: {model_text(exc)}") from None


def max_abs_difference(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, bool]:
    """The largest absolute difference between two runs' output tensors, and whether every output
    agrees within float tolerance (`FLOAT_TOLERANCE` of its dtype: the same arithmetic, refolded
    or re-fused, differs in the last bits and no more).

    Raises:
        ServingUnavailable: the outputs differ in number or shape (not the same model's outputs).
    """
    if len(expected) != len(actual):
        raise ServingUnavailable(f"it returns {len(actual)} output tensors where the model returns {len(expected)}")
    worst, within = 0.0, True
    for reference, other in zip(expected, actual):
        if tuple(reference.shape) != tuple(other.shape):
            raise ServingUnavailable(
                f"it returns an output of shape {tuple(other.shape)} where the model returns {tuple(reference.shape)}"
            )
        dtype = reference.dtype if not reference.is_quantized else torch.qint8
        reference, other = _float64(reference), _float64(other)
        difference = (reference - other).abs()
        rtol, atol = FLOAT_TOLERANCE.get(dtype, (0.0, 0.0))  # integer outputs must be equal
        close = (difference <= atol + rtol * reference.abs()) | (torch.isnan(reference) & torch.isnan(other))
        within = within and bool(close.all())
        worst = max(worst, float(difference.nan_to_num().max()) if difference.numel() else 0.0)
    return worst, within


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    return tensor.detach().to(device="cpu", dtype=torch.float64)
