"""torch.export archives the tests make: real ones (torch.export.save of zoo models), ones rewritten
member by member, and hostile ones whose pickles would run code if anything unpickled them."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from tests import zoo


def export_bytes(model: nn.Module, *example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    """torch.export.save of `model` exported on `example` (eval mode), its first dimension dynamic."""
    shapes = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in example) if dynamic_batch else None
    program = torch.export.export(model.eval(), example, dynamic_shapes=shapes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def exported_cnn() -> bytes:
    return export_bytes(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32))


class Branching(nn.Module):
    """Data-dependent control flow kept by torch.export as torch.cond: no trace can hold both paths."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.linear(x), lambda x: -x, (x,))


def exported_branching() -> bytes:
    return export_bytes(Branching(), torch.rand(2, 4))


def members(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rewritten(content: bytes, changes: dict[str, bytes | None]) -> bytes:
    """The archive with members replaced (by their name after the root folder), added, or dropped
    (None)."""
    source = members(content)
    root = next(iter(source)).split("/", 1)[0] + "/"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in source.items():
            tail = name[len(root) :]
            if tail in changes:
                data = changes.pop(tail)
            if data is not None:
                archive.writestr(name, data)
        for tail, data in changes.items():
            if data is not None:
                archive.writestr(root + tail, data)
    return buffer.getvalue()


def config(content: bytes, table: str) -> dict:
    """The weights or constants table of an archive, as JSON."""
    name = next(n for n in members(content) if n.endswith(f"data/{table}/model_{table}_config.json"))
    return json.loads(members(content)[name])


class _TouchOnUnpickle:
    """Unpickling this runs `os.system("touch <path>")`: what a hostile pickle would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_pickle(marker: Path) -> bytes:
    """torch.save of an object whose unpickling creates `marker`."""
    buffer = io.BytesIO()
    torch.save(_TouchOnUnpickle(marker), buffer)
    return buffer.getvalue()


def with_pickled_weight(content: bytes, marker: Path) -> bytes:
    """The archive with its first weight stored as a pickle (use_pickle) that would create `marker`."""
    weights = config(content, "weights")
    fqn = next(iter(weights["config"]))
    entry = weights["config"][fqn]
    entry["use_pickle"] = True
    return rewritten(
        content,
        {
            "data/weights/model_weights_config.json": json.dumps(weights).encode(),
            "data/weights/" + entry["path_name"]: hostile_pickle(marker),
        },
    )


def with_hostile_sample_inputs(content: bytes, marker: Path) -> bytes:
    """The archive with sample inputs that would create `marker` when unpickled unrestricted (torch's
    fallback when its weights-only unpickler refuses them)."""
    return rewritten(content, {"data/sample_inputs/model.pt": hostile_pickle(marker)})
