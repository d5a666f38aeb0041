"""Torch-free checks of uploaded files: TorchScript archive structure and dataset array headers.

The API never unpickles or imports torch: it reads zip directories and array headers only. Full
validation (loading the model) happens in a worker. Each check reads a seekable binary file (a local
file, or a staged upload in an object store read by ranges), never the whole of it.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from typing import BinaryIO

import numpy as np

from app.errors import InvalidInput

_INPUT_NAME = re.compile(r"^input(?:_(\d+))?$")


def check_torchscript_archive(fh: BinaryIO, size: int) -> None:
    """Raise InvalidInput unless the file `fh` (of `size` bytes) is structurally a TorchScript
    archive (a zip with code/)."""
    if size == 0:
        raise InvalidInput("the file is empty", code="empty_file")
    if not zipfile.is_zipfile(fh):
        fh.seek(0)
        head = fh.read(2)
        if head[:1] == b"\x80":
            raise InvalidInput(
                "this is a legacy torch.save pickle, not a TorchScript archive: export the model "
                "with torch.jit.script or torch.jit.trace and save it with torch.jit.save",
                code="not_torchscript",
            )
        raise InvalidInput(
            "the file is not a TorchScript archive (not a zip file, or truncated)", code="not_torchscript"
        )
    try:
        with zipfile.ZipFile(fh) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput(f"the archive is damaged: {exc}", code="not_torchscript") from exc
    names = [entry.filename for entry in entries]
    if any(_points_outside(entry) for entry in entries):
        raise InvalidInput(
            "the archive has entries that point outside it (absolute paths, '..' or links); "
            "torch.jit.save never writes such entries",
            code="not_torchscript",
        )
    has_data = any(n.endswith("/data.pkl") for n in names)
    has_code = any("/code/" in n for n in names)
    has_constants = any(n.endswith("/constants.pkl") for n in names)
    if has_data and not (has_code and has_constants):
        raise InvalidInput(
            "this is a torch.save() pickle of an eager model, not TorchScript: it is refused "
            "(never unpickled); export with torch.jit.script/trace and torch.jit.save",
            code="not_torchscript",
        )
    if not (has_data and has_code):
        raise InvalidInput(
            "the zip file is not a TorchScript archive (no data.pkl and code/ entries)", code="not_torchscript"
        )


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
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype.hasobject:
                    raise InvalidInput(
                        f"array {info.filename[:-4]!r} holds Python objects (pickles are refused)",
                        code="dataset_pickle_refused",
                    )
                arrays[info.filename[:-4]] = {"shape": list(shape), "dtype": str(dtype)}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InvalidInput(f"the .npz file is damaged: {exc}", code="dataset_invalid") from exc
    return arrays


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors_header(fh: BinaryIO, size: int) -> dict[str, dict]:
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) < 8:
        raise InvalidInput("the file is neither .npz nor .safetensors", code="dataset_invalid")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, 100 * 1024 * 1024):
        raise InvalidInput("the file is neither .npz nor .safetensors", code="dataset_invalid")
    try:
        header = json.loads(fh.read(length))
    except ValueError as exc:
        raise InvalidInput("the file is neither .npz nor .safetensors", code="dataset_invalid") from exc
    header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise InvalidInput(f"array {name!r} has unsupported dtype {info.get('dtype')}", code="dataset_invalid")
        begin, end = info["data_offsets"]
        if end > size - 8 - length:
            raise InvalidInput("the .safetensors file is truncated", code="dataset_invalid")
        arrays[name] = {"shape": list(info["shape"]), "dtype": dtype}
    return arrays


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
