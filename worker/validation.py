"""Validating an uploaded model in the isolated child: does torch load it, and what is in it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engines.errors import EngineError, model_text
from worker.engines.exported import exported_to_torchscript, is_exported_archive, load_exported_program
from worker.engines.modules import load_model


def validate_model(emit: Callable[[dict], None], path: str) -> dict:
    """Load a TorchScript file, or a torch.export archive and the TorchScript module traced from it
    (run on its sample inputs), and summarise it; raises EngineError ("model_invalid", or the
    conversion's `export_*` code) with the reason."""
    if is_exported_archive(path):
        program = load_exported_program(path)
        model = exported_to_torchscript(program)
        inputs = _exported_inputs(program)
    else:
        try:
            model = load_model(path)
        except Exception as exc:  # torch raises many types for a bad archive
            raise EngineError("model_invalid", f"torch.jit.load cannot load this file: {model_text(exc)}") from exc
        inputs = _schema_inputs(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers_bytes": buffers,
        "submodules": sum(1 for _ in model.named_modules()) - 1,
        "inputs": inputs,
    }


def _schema_inputs(model: torch.jit.ScriptModule) -> list[dict] | None:
    try:
        return [{"name": a.name, "type": str(a.type)} for a in model.forward.schema.arguments[1:]]
    except (AttributeError, RuntimeError):
        return None


def _exported_inputs(program: torch.export.ExportedProgram) -> list[dict]:
    """The program's tensor inputs with their dtype and shape, a dynamic dimension as `dynamic`."""
    nodes = {node.name: node for node in program.graph_module.graph.nodes if node.op == "placeholder"}
    inputs = []
    for name in program.graph_signature.user_inputs:
        value = nodes[name].meta.get("val")
        if isinstance(value, torch.Tensor):
            dims = ", ".join("dynamic" if isinstance(d, torch.SymInt) else str(d) for d in value.shape)
            inputs.append({"name": name, "type": f"Tensor {str(value.dtype).removeprefix('torch.')} [{dims}]"})
        else:
            inputs.append({"name": name, "type": type(value).__name__})
    return inputs
