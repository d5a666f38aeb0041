"""Torch-free checks of uploaded files: model archive structure (TorchScript, torch.export) and
dataset array headers.

The API never unpickles or imports torch: it reads zip directories and array headers only. Full
validation (loading the model) happens in a worker. Each check reads a seekable binary file (a local
file, or a staged upload in an object store read by ranges), never the whole of it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tokenize
import zipfile
import zlib
from typing import BinaryIO

import numpy as np

from app.errors import InvalidInput

_INPUT_NAME = re.compile(r"^input(?:_(\d+))?$")
# What reading a damaged zip (or an .npy header in one) raises: numpy parses the header with
# Python's tokenizer, and zipfile raises zlib's and its own errors besides BadZipFile.
_DAMAGED_ZIP = (
    zipfile.BadZipFile,
    ValueError,
    OSError,
    EOFError,
    NotImplementedError,
    RuntimeError,  # an encrypted member
    SyntaxError,
    tokenize.TokenError,
    zlib.error,
)


MODEL_FORMATS = ("torchscript", "torch.export")
# The torch.export archive schema this service's torch (pinned, 2.13) reads; tests/test_inspection_fuzz.py
# checks it against torch's own.
EXPORT_SCHEMA_MAJOR = 8
EXPORT_ARCHIVE_VERSION = b"0"
# The graph description is parsed whole here: bounded so an upload cannot make the API build a huge
# JSON tree (a transformer's is a few MB).
EXPORT_JSON_LIMIT = 32 * 1024 * 1024


def inspect_model_archive(fh: BinaryIO, size: int) -> str:
    """The format of an uploaded model from its zip layout alone: "torchscript" (torch.jit.save) or
    "torch.export" (torch.export.save); raises InvalidInput with a code otherwise. Nothing in it is
    unpickled: only member names and the JSON members of a torch.export archive are read."""
    with _model_zip(fh, size) as archive:
        if any(entry.filename.rsplit("/", 1)[-1] == "archive_format" for entry in archive.infolist()):
            _refuse_entries_outside(archive, "export_archive_damaged")
            _check_exported_archive(archive)
            return "torch.export"
        _refuse_entries_outside(archive, "not_torchscript")
        _check_torchscript_entries(archive.namelist())
    return "torchscript"


def check_torchscript_archive(fh: BinaryIO, size: int) -> None:
    """Raise InvalidInput unless the file `fh` (of `size` bytes) is structurally a TorchScript
    archive (a zip with code/)."""
    with _model_zip(fh, size) as archive:
        _refuse_entries_outside(archive, "not_torchscript")
        _check_torchscript_entries(archive.namelist())


def _model_zip(fh: BinaryIO, size: int) -> zipfile.ZipFile:
    """The upload opened as a zip, or InvalidInput saying what it is instead."""
    if size == 0:
        raise InvalidInput("the file is empty", code="empty_file")
    if not zipfile.is_zipfile(fh):
        fh.seek(0)
        head = fh.read(2)
        if head[:1] == b"\x80":
            raise InvalidInput(
                "this is a legacy torch.save pickle, not a model archive: export the model with "
                "torch.jit.script or torch.jit.trace and save it with torch.jit.save, or save "
                "torch.export.export's program with torch.export.save",
                code="not_torchscript",
            )
        raise InvalidInput(
            "the file is neither a TorchScript archive nor a torch.export archive (not a zip file, or truncated)",
            code="not_torchscript",
        )
    try:
        archive = zipfile.ZipFile(fh)
    except _DAMAGED_ZIP as exc:
        raise InvalidInput(f"the archive is damaged: {exc}", code="not_torchscript") from exc
    return archive


def _refuse_entries_outside(archive: zipfile.ZipFile, code: str) -> None:
    if any(_points_outside(entry) for entry in archive.infolist()):
        raise InvalidInput(
            "the archive has entries that point outside it (absolute paths, '..' or links); "
            "torch.jit.save and torch.export.save never write such entries",
            code=code,
        )


def _check_torchscript_entries(names: list[str]) -> None:
    has_data = any(n.endswith("/data.pkl") for n in names)
    has_code = any("/code/" in n for n in names)
    has_constants = any(n.endswith("/constants.pkl") for n in names)
    if has_data and not (has_code and has_constants):
        raise InvalidInput(
            "this is a torch.save() pickle of an eager model, not TorchScript: it is refused "
            "(never unpickled); export with torch.jit.script/trace and torch.jit.save, or torch.export.save",
            code="not_torchscript",
        )
    if not (has_data and has_code):
        raise InvalidInput(
            "the zip file is neither a TorchScript archive (no data.pkl and code/ entries) nor a torch.export "
            "archive (no archive_format entry)",
            code="not_torchscript",
        )


def _damaged(detail: str) -> InvalidInput:
    return InvalidInput(f"the torch.export archive is damaged: {detail}", code="export_archive_damaged")


def _unsupported(detail: str) -> InvalidInput:
    return InvalidInput(f"this torch.export archive is not supported: {detail}", code="export_archive_unsupported")


def _check_exported_archive(archive: zipfile.ZipFile) -> None:
    """A torch.export.save archive as torch.export.load reads it: one root folder holding the
    format marker, the program's JSON, its weight and constant tables and every file they name,
    with no payload stored as a pickle (torch would unpickle those unrestricted)."""
    names = set(archive.namelist())
    root = archive.infolist()[0].filename.split("/", 1)[0] + "/"
    if any(not name.startswith(root) for name in names):
        raise _damaged(f"its members are not all in one root folder ({root!r}), as torch.export.save writes them")
    marker = _read_member(archive, root + "archive_format", 64).strip()
    if marker != b"pt2":
        raise _unsupported(f"archive_format is {marker[:16]!r}, not pt2")
    if any(name.startswith((root + "data/aotinductor/", root + "data/executorch/")) for name in names):
        raise _unsupported(
            "it is a compiled package (AOTInductor or ExecuTorch), not an exported program: save the "
            "program torch.export.export returns with torch.export.save"
        )
    version = _read_member(archive, root + "archive_version", 64).strip() if root + "archive_version" in names else b"0"
    if version != EXPORT_ARCHIVE_VERSION:
        raise _unsupported(f"archive_version {version[:16]!r}; this service reads version 0 (torch 2.13)")
    if {root + "data/weights/model.pt", root + "data/constants/model.pt"} & names:
        raise _unsupported("it stores weights in the legacy pickled layout: save it again with torch.export.save")
    program = _json_member(archive, root + "models/model.json")
    schema = program.get("schema_version") if isinstance(program, dict) else None
    major = schema.get("major") if isinstance(schema, dict) else None
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict) or not isinstance(major, int):
        raise _damaged("models/model.json is not an exported program (no graph_module and schema_version)")
    if major != EXPORT_SCHEMA_MAJOR:
        raise _unsupported(
            f"it was written with export schema {major}; this service reads schema {EXPORT_SCHEMA_MAJOR} (torch 2.13)"
        )
    if root + "data/sample_inputs/model.pt" not in names:
        raise _damaged("it has no sample inputs (data/sample_inputs/model.pt)")
    for table, folder in (("weights", "data/weights/"), ("constants", "data/constants/")):
        config = _json_member(archive, f"{root}{folder}model_{table}_config.json")
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise _damaged(f"{folder}model_{table}_config.json is not a table of payloads")
        for fqn, entry in entries.items():
            _check_payload(names, root + folder, table, fqn, entry)


def _check_payload(names: set[str], folder: str, table: str, fqn: str, entry) -> None:
    path = entry.get("path_name") if isinstance(entry, dict) else None
    if not isinstance(path, str) or not isinstance(entry.get("use_pickle", False), bool):
        raise _damaged(f"the {table} entry {fqn[:80]!r} names no payload file")
    pickled = entry.get("use_pickle") or path.startswith(("custom_obj_", "opaque_obj_"))
    if pickled:
        raise InvalidInput(
            f"the {table} entry {fqn[:80]!r} is stored as a pickle (a tensor subclass or a Python object), "
            "which torch.export.load would unpickle without restriction: it is refused (never unpickled); "
            "export a model whose weights and constants are plain tensors",
            code="export_pickle_refused",
        )
    if table == "constants" and not path.startswith("tensor_"):
        raise _unsupported(f"the constant {fqn[:80]!r} is of a kind torch.export.load does not read ({path[:40]!r})")
    if folder + path not in names:
        raise _damaged(f"the {table} entry {fqn[:80]!r} names {path[:80]!r}, which the archive does not hold")


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, at most `limit` of them (a longer member is refused, never read whole)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _damaged(f"it has no {name.split('/', 1)[-1]} member") from None
    if info.file_size > limit:
        raise _unsupported(f"{name.split('/', 1)[-1]} is larger than {limit} bytes")
    try:
        with archive.open(info) as member:
            return member.read(limit + 1)
    except _DAMAGED_ZIP as exc:
        raise _damaged(f"{name.split('/', 1)[-1]} cannot be read ({exc})") from exc


def _json_member(archive: zipfile.ZipFile, name: str):
    raw = _read_member(archive, name, EXPORT_JSON_LIMIT)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _damaged(f"{name.split('/', 1)[-1]} is not JSON") from exc


def _points_outside(entry: zipfile.ZipInfo) -> bool:
    name = entry.filename.replace("\\", "/")
    is_link = (entry.external_attr >> 16) & 0o170000 == 0o120000
    return is_link or name.startswith("/") or ".." in name.split("/") or ":" in name.split("/", 1)[0]


def inspect_dataset(fh: BinaryIO, size: int) -> tuple[str, dict[str, dict], int]:
    """Read array names, shapes and dtypes of an .npz or .safetensors file without loading data.

    Returns (file_format, {name: {shape, dtype}}, num_samples); raises InvalidInput with a reason.
    """
    if zipfile.is_zipfile(fh):
        file_format, arrays = "npz", _npz_headers(fh)
    else:
        file_format, arrays = "safetensors", _safetensors_header(fh, size)
    return file_format, arrays, _check_arrays(arrays)


def _npz_headers(fh: BinaryIO) -> dict[str, dict]:
    arrays = {}
    try:
        with zipfile.ZipFile(fh) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise InvalidInput(f"unexpected member {info.filename!r} in the .npz", code="dataset_invalid")
                name = info.filename[:-4]
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    header_size = fh.tell()
                if dtype.hasobject:
                    raise InvalidInput(
                        f"array {name!r} holds Python objects (pickles are refused)", code="dataset_pickle_refused"
                    )
                # The header is only a claim: the worker loads what the member holds, so both must agree.
                if math.prod(shape) * dtype.itemsize != info.file_size - header_size:
                    raise InvalidInput(
                        f"array {name!r} declares shape {list(shape)} of {dtype} but holds "
                        f"{info.file_size - header_size} bytes of data",
                        code="dataset_invalid",
                    )
                arrays[name] = {"shape": list(shape), "dtype": str(dtype)}
    except _DAMAGED_ZIP as exc:
        raise InvalidInput(f"the .npz file is damaged: {exc}", code="dataset_invalid") from exc
    return arrays


# safetensors dtype → (numpy name, bytes per element): the dtypes the worker's loader
# (safetensors.numpy) reads; BF16 is not among them, since numpy has no bfloat16.
_ST_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_NOT_A_DATASET = "the file is neither .npz nor .safetensors"


def _safetensors_header(fh: BinaryIO, size: int) -> dict[str, dict]:
    """The arrays a .safetensors header declares, held to the rules the worker's loader enforces:
    a JSON object of {dtype, shape, data_offsets} entries whose byte ranges tile the data exactly."""
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) < 8:
        raise InvalidInput(_NOT_A_DATASET, code="dataset_invalid")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, 100 * 1024 * 1024):
        raise InvalidInput(_NOT_A_DATASET, code="dataset_invalid")
    raw = fh.read(length)
    # UTF-8 and starting with '{', as the loader demands (json.loads alone would also take UTF-16).
    try:
        header = json.loads(raw.decode("utf-8")) if raw[:1] == b"{" else None
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(_NOT_A_DATASET, code="dataset_invalid") from exc
    if header is None:
        raise InvalidInput(_NOT_A_DATASET, code="dataset_invalid")
    if not isinstance(header, dict):
        raise InvalidInput("the .safetensors header is not a JSON object of arrays", code="dataset_invalid")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidInput("the .safetensors __metadata__ must map names to strings", code="dataset_invalid")
    data_size = size - 8 - length
    arrays, ranges = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _safetensors_entry(name, entry)
        if end - begin != math.prod(shape) * _ST_DTYPES[dtype][1]:
            raise InvalidInput(
                f"array {name!r}: shape {shape} of {dtype} does not fill its data_offsets [{begin}, {end}]",
                code="dataset_invalid",
            )
        if end > data_size:
            raise InvalidInput("the .safetensors file is truncated", code="dataset_invalid")
        arrays[name] = {"shape": shape, "dtype": _ST_DTYPES[dtype][0]}
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise InvalidInput("the arrays' data_offsets overlap or leave gaps", code="dataset_invalid")
        position = end
    if position != data_size:
        raise InvalidInput("the .safetensors file has bytes no array claims", code="dataset_invalid")
    return arrays


def _safetensors_entry(name: str, entry) -> tuple[str, list[int], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, or InvalidInput naming what is wrong."""

    def refuse(what: str) -> InvalidInput:
        return InvalidInput(f"array {name!r} in the .safetensors header {what}", code="dataset_invalid")

    def is_count(value) -> bool:  # what the loader reads as a 64-bit size
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63

    if not isinstance(entry, dict):
        raise refuse("is not an object with dtype, shape and data_offsets")
    dtype = entry.get("dtype")
    if dtype == "BF16":
        raise refuse("is bfloat16, which datasets cannot hold: store it as float32 (F32)")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise refuse(f"has unsupported dtype {dtype!r} (supported: {', '.join(_ST_DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        raise refuse("has no shape (a list of non-negative integers)")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise refuse("has no data_offsets (two non-negative integers)")
    begin, end = offsets
    if begin > end:
        raise refuse(f"has data_offsets [{begin}, {end}] that end before they begin")
    return dtype, shape, (begin, end)


def _check_arrays(arrays: dict[str, dict]) -> int:
    inputs = sorted(int(m.group(1) or 0) for m in map(_INPUT_NAME.match, arrays) if m)
    unknown = [n for n in arrays if not _INPUT_NAME.match(n) and n != "label"]
    if unknown:
        raise InvalidInput(
            f"unexpected arrays {unknown}: name them 'input' (or 'input_0'…) and 'label'", code="dataset_invalid"
        )
    if not inputs:
        raise InvalidInput("the dataset has no 'input' (or 'input_0') array", code="dataset_invalid")
    if "input" in arrays and len(inputs) > 1:
        raise InvalidInput("use either 'input' or 'input_0'…, not both", code="dataset_invalid")
    if inputs != list(range(len(inputs))):
        raise InvalidInput(f"input arrays must be numbered 0…k-1 without gaps, got {inputs}", code="dataset_invalid")
    if "label" in arrays and not arrays["label"]["dtype"].startswith(("int", "uint")):
        raise InvalidInput("'label' must hold integer class ids (int64)", code="dataset_invalid")
    counts = {info["shape"][0] if info["shape"] else None for info in arrays.values()}
    if len(counts) != 1 or None in counts:
        raise InvalidInput("all arrays must share the same first (sample) dimension", code="dataset_invalid")
    num = counts.pop()
    if num == 0:
        raise InvalidInput("the dataset has no samples", code="dataset_invalid")
    return int(num)
