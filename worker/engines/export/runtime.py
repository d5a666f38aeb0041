"""ONNX Runtime sessions as the export package uses them: the CPU execution provider, the job's
threads, torch tensors in and out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def ort_session(model: str | Path | bytes, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(session, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The session's outputs on positional torch inputs, as CPU tensors in output order."""
    names = [i.name for i in session.get_inputs()]
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feed)]
