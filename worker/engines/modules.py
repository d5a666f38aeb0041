"""Loading, saving and walking TorchScript modules, shared by every engine."""

from __future__ import annotations

import fnmatch
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from worker.engines.exported import exported_to_torchscript, is_exported_archive, load_exported_program


def load_model(source: str | Path | bytes, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript archive (path or bytes) onto `device`, in eval mode; a torch.export
    archive (a path) is traced into TorchScript first (`worker.engines.exported`)."""
    if isinstance(source, (bytes, bytearray)):
        model = torch.jit.load(io.BytesIO(source), map_location=device)
    elif is_exported_archive(source):
        model = exported_to_torchscript(load_exported_program(source)).to(device)
    else:
        model = torch.jit.load(str(source), map_location=device)
    return model.eval()


def save_model(model: torch.jit.ScriptModule, path: str | Path) -> int:
    """Save a TorchScript module; returns the file size in bytes."""
    torch.jit.save(model, str(path))
    return Path(path).stat().st_size


def clone_model(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """An independent copy (a save/load round trip: the only copy TorchScript guarantees)."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.jit.load(buffer, map_location=device).train(model.training)


def module_kind(module: torch.nn.Module) -> str:
    """The Python class name of a module, also for scripted ones (`Conv2d`, `Linear`, …)."""
    return getattr(module, "original_name", type(module).__name__)


def named_modules_of_kind(model: torch.nn.Module, kinds: Iterable[str]) -> Iterator[tuple[str, torch.nn.Module]]:
    """Submodules whose class name is one of `kinds`, with their dotted names."""
    wanted = set(kinds)
    for name, module in model.named_modules():
        if name and module_kind(module) in wanted:
            yield name, module


def is_excluded(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether a dotted module name matches any of the user's `exclude` globs."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in (patterns or ()))
