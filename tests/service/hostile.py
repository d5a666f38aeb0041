"""Hostile TorchScript models, as an attacker would upload them: `torch.from_file` reads and writes
any path the process can reach, in `forward` and in a scripted `__setstate__` (run by torch.jit.load)."""

from __future__ import annotations

import torch
from torch import nn


class FileReader(nn.Module):
    """forward reads the first bytes of `path` and raises them as its error message."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        values: list[int] = data.to(torch.int64).tolist()
        text = ""
        for value in values:
            text += chr(value)
        raise RuntimeError("stolen: " + text)


class ForwardWriter(nn.Module):
    """forward zeroes `size` bytes of `path` (creating it if missing) through a shared mapping."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Summing the mapped tensor keeps TorchScript from dropping the write as dead code.
        return x + torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8).fill_(0).sum()


class LoadTimeWriter(nn.Module):
    """Zeroes `size` bytes of `path` from `__setstate__`, i.e. inside torch.jit.load, before any job."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path, self.size = path, size
        self.weight = nn.Parameter(torch.ones(1))

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, torch.Tensor, bool]:
        return (self.path, self.size, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, torch.Tensor, bool]) -> None:
        self.path, self.size, self.training = state[0], state[1], state[3]
        self.weight = (
            state[2] + torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8).fill_(0).sum()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Chatty(nn.Module):
    """forward raises an error message of 2**`doublings` characters."""

    def __init__(self, doublings: int):
        super().__init__()
        self.doublings = doublings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        text = "A"
        for _ in range(self.doublings):
            text = text + text
        raise RuntimeError("model says: " + text)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    return torch.jit.script(module)


class Hoarder(nn.Module):
    """forward allocates without bound: one tensor of `elements`, or ever more in a loop."""

    def __init__(self, elements: int, loop: bool):
        super().__init__()
        self.elements, self.loop = elements, loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held: list[torch.Tensor] = [torch.ones(self.elements)]
        while self.loop:
            held.append(torch.ones(self.elements))
        return x + held[0].sum()
