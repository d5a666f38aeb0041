"""torch.export archives (`.pt2`, written by torch.export.save) in: load the exported program and
trace it into the TorchScript module every engine takes, or say why that cannot be done.

The conversion runs in the sandboxed child at each load (validation, then each job), never stored
as a derived blob: the trace is a function of the upload and the worker's torch alone and takes
0.2–1.3 s for the test zoo's models (benchmarks/export_conversion.py), while a stored TorchScript
copy would be a second blob per model to keep in step with it, verify, collect and migrate.
Validation converts once, so a model that cannot be converted is refused at upload, not by each job.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from worker.engines.errors import EngineError, model_text

# How far the traced module may drift from the exported program it was made from: the same
# kernels run in both, so anything above float rounding means the trace recorded something else.
AGREEMENT_RTOL = 1e-4
AGREEMENT_ATOL = 1e-5
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"


def is_exported_archive(path: str | Path) -> bool:
    """Whether the file is a torch.export archive: a zip whose `archive_format` member says pt2
    (a TorchScript archive has none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            marker = next((n for n in archive.namelist() if n.split("/")[-1] == "archive_format"), None)
            return marker is not None and archive.read(marker).strip() == b"pt2"
    except (zipfile.BadZipFile, OSError, KeyError):
        return False


def load_exported_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load the exported program of a `.pt2` archive, its sample inputs read by the restricted
    (weights-only) unpickler only.

    torch.export.load falls back to the unrestricted unpickler when the restricted one refuses the
    sample inputs (torch/_export/serde/serialize.py, deserialize_torch_artifact): an archive could
    run any Python that way. Reading them here first, restricted, refuses such an archive before
    torch.export.load sees it. (Weights and constants stored as pickles are refused by the
    upload's structure check.)

    Raises:
        EngineError: `export_pickle_refused` for sample inputs that are not plain tensors,
            `model_invalid` when torch.export.load cannot load the archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + _SAMPLE_INPUTS)), None)
            sample = archive.read(member) if member else b""
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineError("model_invalid", f"the torch.export archive cannot be read: {exc}") from exc
    if sample:
        try:
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as exc:  # the restricted unpickler raises many types
            raise EngineError(
                "export_pickle_refused",
                "the archive's sample inputs hold more than tensors (the weights-only unpickler refuses "
                "them), so they are never unpickled: export the model with tensor example inputs",
            ) from exc
    try:
        # an open file, not the path: torch.export.load warns about (and may one day refuse) a path
        # not ending in .pt2, and the sandbox names its copy of every upload model.pt
        with open(path, "rb") as fh:
            return torch.export.load(fh)
    except Exception as exc:  # torch raises many types for a bad archive
        raise EngineError("model_invalid", f"torch.export.load cannot load this file: {model_text(exc)}") from exc


def exported_to_torchscript(program: torch.export.ExportedProgram) -> torch.jit.ScriptModule:
    """Trace an exported program's module into TorchScript on its own sample inputs, and check that
    the trace computes what the program does, also at another batch size.

    Args:
        program: what torch.export.load returned; its user inputs must be positional tensors with
            a dynamic first (batch) dimension, since jobs run every model at several batch sizes.

    Returns:
        The traced module in eval mode; its submodules keep the exported program's names, and the
        types of the modules they stand for (`Conv2d`, `Linear`, …), so layer rules and `exclude`
        globs name them as they would in a trace of the original model.

    Raises:
        EngineError: `export_not_traceable` (control flow that tracing would freeze, inputs that
            are not tensors, a trace that does not agree with the program) or
            `export_static_batch`, each with the reason.

    Example:
        module = exported_to_torchscript(load_exported_program("model.pt2"))
    """
    _refuse_control_flow(program)
    example = _example_inputs(program)
    _require_dynamic_batch(program)
    module = program.module()
    _drop_input_guards(module)
    _read_sizes_from_tensors(module)
    _name_modules_after_originals(module, program)
    try:
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
    except Exception as exc:
        raise EngineError(
            "export_not_traceable",
            f"the exported program cannot be traced into TorchScript: {model_text(exc)}",
        ) from exc
    traced = traced.eval()
    _check_agreement(program, traced, example)
    _check_agreement(program, traced, tuple(torch.cat([x, x[:1]]) for x in example))
    return traced


# The higher-order operators that choose among graphs of their own (branches, loop bodies) at run
# time: a trace would follow one path and freeze it. (Others, such as a grad-mode wrapper, are left
# to the trace, which refuses what it cannot record.)
CONTROL_FLOW_OPERATORS = frozenset({"cond", "while_loop", "map_impl", "scan", "associative_scan"})


def _refuse_control_flow(program: torch.export.ExportedProgram) -> None:
    for node in program.graph_module.graph.nodes:
        if (
            node.op == "call_function"
            and isinstance(node.target, torch._ops.HigherOrderOperator)
            and node.target.name() in CONTROL_FLOW_OPERATORS
        ):
            raise EngineError(
                "export_not_traceable",
                f"the exported program has data-dependent control flow ({node.target.name()} at node "
                f"{node.name!r}); tracing it into TorchScript would keep only the path its example takes. "
                "Export a model without torch.cond/while_loop/map, or upload torch.jit.script of it",
            )


def _example_inputs(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    example = program.example_inputs
    if not example:
        raise EngineError(
            "export_not_traceable",
            "the archive holds no sample inputs to trace with: save a program exported with example inputs",
        )
    args, kwargs = example
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise EngineError(
            "export_not_traceable",
            "the exported program takes keyword or non-tensor inputs; Compactor calls a model with "
            "positional tensors only (one per dataset array input_0…)",
        )
    return tuple(args)


def _require_dynamic_batch(program: torch.export.ExportedProgram) -> None:
    static = [
        (node.name, int(node.meta["val"].shape[0]))
        for node in program.graph_module.graph.nodes
        if node.op == "placeholder"
        and node.name in program.graph_signature.user_inputs
        and isinstance(node.meta.get("val"), torch.Tensor)
        and node.meta["val"].dim() > 0
        and not isinstance(node.meta["val"].shape[0], torch.SymInt)
    ]
    if static:
        name, size = static[0]
        raise EngineError(
            "export_static_batch",
            f"the exported program fixes the batch size of input {name!r} at {size}: jobs run a model at "
            "several batch sizes, so export it with a dynamic first dimension, e.g. "
            f"dynamic_shapes={{{name!r}: {{0: torch.export.Dim('batch')}}}}",
        )


def _drop_input_guards(module: torch.fx.GraphModule) -> None:
    """Remove the unlifted module's input checks (a forward pre-hook and a guard submodule): they
    compare inputs with the program's symbolic shapes in Python, which a trace cannot record (and
    fails on), and an empty submodule would only clutter the TorchScript."""
    module._forward_pre_hooks.clear()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(module, "_guards_fn"):
        delattr(module, "_guards_fn")
    module.recompile()


def _read_sizes_from_tensors(module: torch.fx.GraphModule) -> None:
    """Make the graph's size arithmetic something a trace records.

    The tracer records `tensor.size(dim)` as a size read, and an int argument made from one as that
    read, but only when the call goes through torch's Python bindings (`torch.zeros`,
    `Tensor.view`): an `aten.sym_size` call, or an `OpOverload` call such as
    `torch.ops.aten.zeros.default`, gives it the plain number of the trace's sample, which would
    bake the sample's batch size into the TorchScript (an LSTM's initial state sized for it
    corrupts memory at any other batch). So sizes are read with `Tensor.size`, and a call taking
    one goes through the binding of the same op.
    """
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default):
            with graph.inserting_before(node):
                size = graph.call_method("size", node.args, node.kwargs)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
        elif isinstance(node.target, torch._ops.OpOverload) and _takes_a_size(node):
            node.target = _python_binding(node.target) or node.target
    module.recompile()


def _takes_a_size(node: torch.fx.Node) -> bool:
    """Whether an argument of the call is an int computed in the graph (a size, or arithmetic on one)."""
    flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
    return any(
        isinstance(arg, torch.fx.Node) and not isinstance(arg.meta.get("val"), torch.Tensor) and arg.op != "get_attr"
        for arg in flat
    )


def _slice(tensor: torch.Tensor, dim: int = 0, start=None, end=None, step: int = 1) -> torch.Tensor:
    """`aten.slice.Tensor` by indexing: the op has no Python binding, and indexing records its bounds."""
    return tensor[(slice(None),) * (dim % tensor.dim()) + (slice(start, end, step),)]


def _python_binding(op: torch._ops.OpOverload):
    """The function or method torch binds the op to in Python (same arguments), or None."""
    if op is torch.ops.aten.slice.Tensor:
        return _slice
    name = op._schema.name.split("::", 1)[-1]
    return getattr(torch._C._VariableFunctions, name, None) or getattr(torch.Tensor, name, None)


def _name_modules_after_originals(module: torch.nn.Module, program: torch.export.ExportedProgram) -> None:
    """Give each holder of parameters the class name of the module it was exported from.

    The unlifted module keeps the original hierarchy but as plain `Module`s, so engines that pick
    layers by kind (`Conv2d`, `BatchNorm2d`) would see none; TorchScript names a submodule's type
    after its Python class, so a subclass of that name gives them back their kind.
    """
    kinds: dict[str, str] = {}
    for node in program.graph_module.graph.nodes:
        for path, type_name in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                kinds.setdefault(path, str(type_name).rsplit(".", 1)[-1])
    classes: dict[str, type] = {}
    for name, submodule in module.named_modules():
        kind = kinds.get(name)
        if name and kind and kind.isidentifier() and type(submodule) is torch.nn.Module:
            cls = classes.setdefault(kind, type(kind, (torch.nn.Module,), {"__module__": "compactor.exported"}))
            submodule.__class__ = cls


def _check_agreement(
    program: torch.export.ExportedProgram, traced: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...]
) -> None:
    batch = inputs[0].shape[0]
    with torch.inference_mode():
        try:
            expected = [program.module()(*inputs) for _ in range(2)]
        except Exception as exc:
            raise EngineError(
                "export_not_traceable",
                f"the exported program does not run on its own sample inputs at batch {batch}: {model_text(exc)}",
            ) from exc
        try:
            actual = traced(*inputs)
        except Exception as exc:
            raise EngineError(
                "export_not_traceable",
                f"the module traced from the exported program does not run at batch {batch}: {model_text(exc)}",
            ) from exc
    if not _same(*expected):
        raise EngineError(
            "export_not_traceable",
            "the exported program gives different outputs on the same inputs (was it exported in training "
            "mode, with dropout active?): export model.eval()",
        )
    if not _same(expected[0], actual):
        raise EngineError(
            "export_not_traceable",
            f"the module traced from the exported program computes something else at batch {batch} "
            "(its graph depends on values a trace freezes): upload torch.jit.script of the model",
        )


def _same(first, second) -> bool:
    want, got = _leaves(first), _leaves(second)
    return len(want) == len(got) and all(
        w.shape == g.shape and w.dtype == g.dtype and torch.allclose(w, g, rtol=AGREEMENT_RTOL, atol=AGREEMENT_ATOL)
        if w.is_floating_point()
        else torch.equal(w, g)
        for w, g in zip(want, got, strict=False)
    )


def _leaves(output) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
