"""Validating an uploaded model in the isolated child: does torch load it, and what is in it."""

from __future__ import annotations

from collections.abc import Callable

from worker.engines.errors import EngineError, model_text
from worker.engines.modules import load_model

_MAX_KINDS, _MAX_KIND_CHARS = 64, 64


def validate_model(emit: Callable[[dict], None], path: str) -> dict:
    """Load a TorchScript file and summarise it; raises EngineError("model_invalid") with the reason."""
    try:
        model = load_model(path)
    except Exception as exc:  # torch raises many types for a bad archive
        raise EngineError("model_invalid", f"torch.jit.load cannot load this file: {model_text(exc)}") from exc
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    inputs = []
    try:
        for argument in model.forward.schema.arguments[1:]:
            inputs.append({"name": argument.name, "type": str(argument.type)})
    except (AttributeError, RuntimeError):
        inputs = None
    layers: dict[str, int] = {}
    for _, module in model.named_modules():
        # Class names come from the upload: bounded in length and number before anyone shows them.
        kind = str(getattr(module, "original_name", type(module).__name__))[:_MAX_KIND_CHARS]
        if kind in layers or len(layers) < _MAX_KINDS:
            layers[kind] = layers.get(kind, 0) + 1
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers_bytes": buffers,
        "submodules": sum(1 for _ in model.named_modules()) - 1,
        "inputs": inputs,
        # Module kinds by count: what a search proposes candidates from (app.services.search_space).
        "layers": layers,
    }
