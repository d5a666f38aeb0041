"""Targets for isolation tests: child work that crashes, hangs, exhausts memory, or succeeds."""

import ctypes
import time


def segfault(emit):
    emit({"stage": "about to crash"})
    ctypes.string_at(0)


def hang(emit):
    while True:
        emit({"stage": "spinning"})
        time.sleep(0.05)


def allocate(emit, gib: int):
    import torch

    return torch.empty(gib * 1024**3, dtype=torch.uint8).fill_(1).sum().item()


def add(emit, a, b):
    emit({"stage": "adding"})
    return a + b
