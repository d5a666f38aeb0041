"""The upload inspectors on structured mutations of real files: a TorchScript archive made by
torch.jit.save, a torch.export archive made by torch.export.save, datasets made by numpy and
safetensors. Whatever the bytes, an inspector answers or raises InvalidInput (a 422 with a code),
never anything else (a 500), and reads no pickle; a dataset it accepts is one the worker's loader
reads, with the shapes it declared."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from app.errors import InvalidInput
from app.inspection import EXPORT_SCHEMA_MAJOR, check_torchscript_archive, inspect_dataset, inspect_model_archive
from tests import exported, zoo
from worker.engines.data import load_dataset

# Rewritten archives may repeat a name on purpose (zipfile warns).
pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

# Derandomized: the same examples on every run, so CI is repeatable; no example database on disk.
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _torchscript() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(zoo.trace(zoo.SequentialCNN(), torch.rand(1, 1, 32, 32)), buffer)
    return buffer.getvalue()


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": rng.random((6, 3), dtype=np.float32), "label": np.arange(6, dtype=np.int64)}


MODEL = _torchscript()
EXPORTED = exported.exported_cnn()
SAFETENSORS = save(_arrays())
NPZ = {}
for _name, _writer in (("stored", np.savez), ("compressed", np.savez_compressed)):
    _buffer = io.BytesIO()
    _writer(_buffer, **_arrays())
    NPZ[_name] = _buffer.getvalue()


# Member names a zip can hold: ZipInfo cuts a name at its first NUL, and an empty name is no member.
ENTRY_NAMES = st.text(alphabet=st.characters(blacklist_characters="\x00"), min_size=1, max_size=30)


@st.composite
def byte_damage(draw, content: bytes) -> bytes:
    """Flipped bytes, a cut, or bytes appended: what a broken transfer or a bad writer leaves."""
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=16))


@st.composite
def directory_damage(draw, content: bytes) -> bytes:
    """Bytes of the zip's central directory (names, flags, sizes, offsets) changed."""
    start = content.rindex(b"PK\x05\x06")
    start = struct.unpack("<I", content[start + 16 : start + 20])[0]
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(start, len(data) - 1))] = draw(st.sampled_from([0, 1, 0x08, 0x80, 0xFF]))
    return bytes(data)


@st.composite
def rezipped(draw, content: bytes) -> bytes:
    """The archive rewritten entry by entry (valid CRCs): entries renamed, dropped, emptied,
    replaced with junk, turned into links, or added."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as source, zipfile.ZipFile(buffer, "w") as archive:
        for entry in source.infolist():
            action = draw(st.sampled_from(["keep"] * 6 + ["rename", "drop", "junk", "link"]))
            data = source.read(entry)
            if action == "drop":
                continue
            info = zipfile.ZipInfo(entry.filename)
            if action == "rename":
                info = zipfile.ZipInfo(draw(ENTRY_NAMES))
            elif action == "junk":
                data = draw(st.binary(max_size=64))
            elif action == "link":
                info.external_attr = 0o120777 << 16
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            archive.writestr(info, data)
        for _ in range(draw(st.integers(0, 2))):
            archive.writestr(draw(ENTRY_NAMES), draw(st.binary(max_size=32)))
    return buffer.getvalue()


def _inspect(path: Path):
    """The dataset inspector on a file, as the upload path calls it (a seekable file and its size)."""
    with open(path, "rb") as fh:
        return inspect_dataset(fh, path.stat().st_size)


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "upload"
    path.write_bytes(content)
    return path


@FUZZ
@given(data=st.data())
def test_model_inspector_refuses_cleanly(tmp_path, data):
    content = data.draw(st.one_of(byte_damage(MODEL), directory_damage(MODEL), rezipped(MODEL), st.binary(max_size=64)))
    path = _write(tmp_path, content)
    try:
        with open(path, "rb") as fh:
            check_torchscript_archive(fh, len(content))
    except InvalidInput:
        pass


@FUZZ
@given(data=st.data())
def test_model_inspector_refuses_damaged_exported_archives_cleanly(tmp_path, data):
    content = data.draw(
        st.one_of(byte_damage(EXPORTED), directory_damage(EXPORTED), rezipped(EXPORTED), exported_json_variant())
    )
    path = _write(tmp_path, content)
    try:
        with open(path, "rb") as fh:
            assert inspect_model_archive(fh, len(content)) in ("torchscript", "torch.export")
    except InvalidInput as refused:
        assert refused.code in {"not_torchscript", "empty_file"} or refused.code.startswith("export_")


@st.composite
def exported_json_variant(draw) -> bytes:
    """The real .pt2 with one of its JSON members (the program, the weights or constants table)
    changed anywhere in its structure, or replaced by other JSON or by bytes that are not JSON."""
    member = draw(
        st.sampled_from(
            [
                "models/model.json",
                "data/weights/model_weights_config.json",
                "data/constants/model_constants_config.json",
            ]
        )
    )
    table = json.loads(exported.members(EXPORTED)[next(n for n in exported.members(EXPORTED) if n.endswith(member))])
    how = draw(st.sampled_from(["whole", "top", "entry", "field", "bytes"]))
    if how == "whole":
        table = draw(JSON)
    elif how == "top" and isinstance(table, dict) and table:
        table[draw(st.sampled_from(sorted(table)))] = draw(JSON)
    elif how in ("entry", "field") and isinstance(table.get("config"), dict) and table["config"]:
        name = draw(st.sampled_from(sorted(table["config"])))
        if how == "entry":
            table["config"][name] = draw(JSON)
        else:
            field = draw(st.sampled_from(["path_name", "use_pickle", "tensor_meta", "is_param"]))
            table["config"][name][field] = draw(JSON | st.sampled_from([True, "weight_9", "custom_obj_0", "../x"]))
    raw = draw(st.binary(max_size=32)) if how == "bytes" else json.dumps(table).encode()
    return exported.rewritten(EXPORTED, {member: raw})


def test_the_exported_archive_check_reads_the_schema_this_torch_writes():
    from torch._export.serde.schema import SCHEMA_VERSION

    assert EXPORT_SCHEMA_MAJOR == SCHEMA_VERSION[0]


def test_real_archives_are_recognised_by_format():
    assert inspect_model_archive(io.BytesIO(EXPORTED), len(EXPORTED)) == "torch.export"
    assert inspect_model_archive(io.BytesIO(MODEL), len(MODEL)) == "torchscript"


def _refusal(content: bytes) -> InvalidInput:
    with pytest.raises(InvalidInput) as refused:
        inspect_model_archive(io.BytesIO(content), len(content))
    return refused.value


def _program_with(**changes) -> bytes:
    name = next(n for n in exported.members(EXPORTED) if n.endswith("models/model.json"))
    program = {**json.loads(exported.members(EXPORTED)[name]), **changes}
    return exported.rewritten(EXPORTED, {"models/model.json": json.dumps(program).encode()})


@pytest.mark.parametrize(
    "changes, code, words",
    [
        ({"models/model.json": b"{not json"}, "export_archive_damaged", "not JSON"),
        ({"models/model.json": None}, "export_archive_damaged", "no models/model.json"),
        ({"data/weights/weight_0": None}, "export_archive_damaged", "does not hold"),
        ({"data/sample_inputs/model.pt": None}, "export_archive_damaged", "no sample inputs"),
        ({"archive_format": b"zip"}, "export_archive_unsupported", "not pt2"),
        ({"archive_version": b"7"}, "export_archive_unsupported", "archive_version"),
        ({"data/aotinductor/model/model.so": b"\x7fELF"}, "export_archive_unsupported", "compiled package"),
        ({"data/weights/model.pt": b"\x80\x02"}, "export_archive_unsupported", "legacy"),
        ({"../escape.py": b"print()"}, "export_archive_damaged", "outside"),
    ],
)
def test_damaged_and_unsupported_exported_archives_are_refused_with_a_code(changes, code, words):
    refused = _refusal(exported.rewritten(EXPORTED, dict(changes)))

    assert refused.code == code and words in refused.detail


def test_an_archive_of_another_export_schema_is_unsupported():
    refused = _refusal(_program_with(schema_version={"major": EXPORT_SCHEMA_MAJOR + 1, "minor": 0}))

    assert refused.code == "export_archive_unsupported" and f"schema {EXPORT_SCHEMA_MAJOR + 1}" in refused.detail


def test_a_weight_stored_as_a_pickle_is_refused_without_unpickling_it(tmp_path):
    marker = tmp_path / "ran"

    refused = _refusal(exported.with_pickled_weight(EXPORTED, marker))

    assert refused.code == "export_pickle_refused" and not marker.exists()


def test_a_constant_that_is_a_python_object_is_refused():
    constants = {"config": {"table": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}}}
    content = exported.rewritten(
        EXPORTED,
        {
            "data/constants/model_constants_config.json": json.dumps(constants).encode(),
            "data/constants/opaque_obj_0": b"\x80\x04N.",
        },
    )

    assert _refusal(content).code == "export_pickle_refused"


@st.composite
def safetensors_variant(draw) -> bytes:
    """The real file with its JSON header changed anywhere in its structure, or its length prefix
    or data damaged."""
    (length,) = struct.unpack("<Q", SAFETENSORS[:8])
    header, body = json.loads(SAFETENSORS[8 : 8 + length]), SAFETENSORS[8 + length :]
    names = sorted(header)
    where = draw(st.sampled_from(["whole", "entry", "field", "number", "rename", "delete"]))
    name = draw(st.sampled_from(names))
    if where == "whole":
        header = draw(JSON)
    elif where == "entry":
        header[name] = draw(JSON)
    elif where in ("field", "delete"):
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if where == "delete":
            header[name].pop(field, None)
        else:
            header[name][field] = draw(
                JSON | st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "BF16", "F8_E4M3", "U64"])
            )
    elif where == "number" and name != "__metadata__":
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        values = header[name][field]
        if values:
            values[draw(st.integers(0, len(values) - 1))] += draw(st.integers(-64, 64))
    elif where == "rename":
        header[draw(st.text(max_size=8))] = header.pop(name)
    raw = json.dumps(header).encode()
    prefix = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**40]))
    body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    return struct.pack("<Q", max(prefix, 0)) + raw + body


@st.composite
def npz_variant(draw) -> bytes:
    """A real .npz with one array's .npy header rewritten: other shapes, dtypes, orders, junk."""
    source = NPZ[draw(st.sampled_from(sorted(NPZ)))]
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as dst:
        target = draw(st.sampled_from(src.namelist()))
        for name in src.namelist():
            data = src.read(name)
            if name == target:
                magic, rest = data[:8], data[8:]
                (header_len,) = struct.unpack("<H", rest[:2])
                payload = rest[2 + header_len :]
                shape = draw(st.lists(st.integers(-2, 2**40), max_size=4).map(tuple) | st.just((6, 3)))
                descr = draw(st.sampled_from(["<f4", "<f8", "<i8", "|O", "|b1", "<U3", "V8", "junk"]))
                order = draw(st.sampled_from(["False", "True", "0", "None"]))
                text = f"{{'descr': {descr!r}, 'fortran_order': {order}, 'shape': {shape!r}, }}"
                if draw(st.booleans()):
                    text = draw(st.text(max_size=40))
                header = text.encode("latin-1", "replace").ljust(118) + b"\n"
                data = magic + struct.pack("<H", len(header)) + header + payload[: draw(st.integers(0, len(payload)))]
            dst.writestr(name, data)
    return buffer.getvalue()


def _loads_as_declared(path: Path, arrays: dict[str, dict], num_samples: int) -> None:
    """An accepted dataset is one the worker loads, with the declared shapes."""
    data = load_dataset(path)
    assert data.num_samples == num_samples
    inputs = {name: info for name, info in arrays.items() if name != "label"}
    assert [list(t.shape) for t in data.inputs] == [info["shape"] for _, info in sorted(inputs.items())]


@FUZZ
@given(data=st.data())
def test_dataset_inspector_refuses_cleanly_and_accepts_only_loadable_files(tmp_path, data):
    content = data.draw(st.one_of(safetensors_variant(), npz_variant()))
    path = _write(tmp_path, content)
    try:
        _, arrays, num_samples = _inspect(path)
    except InvalidInput:
        return
    _loads_as_declared(path, arrays, num_samples)


@FUZZ
@given(data=st.data())
def test_dataset_inspector_refuses_damaged_bytes_cleanly(tmp_path, data):
    content = data.draw(st.one_of(byte_damage(SAFETENSORS), byte_damage(NPZ["stored"]), byte_damage(NPZ["compressed"])))
    path = _write(tmp_path, content)
    try:
        _inspect(path)
    except InvalidInput:
        pass


@pytest.mark.parametrize(
    "header",
    [
        [],
        "hello",
        {"input": 1},
        {"input": {"dtype": "F32", "shape": [6, 3]}},
        {"input": {"dtype": "F32", "shape": 18, "data_offsets": [0, 72]}},
        {"input": {"dtype": ["F32"], "shape": [6, 3], "data_offsets": [0, 72]}},
        {"input": {"dtype": "BF16", "shape": [6, 3], "data_offsets": [0, 36]}},
        {"input": {"dtype": "F32", "shape": [6, 3], "data_offsets": [72, 0]}},
        {"input": {"dtype": "F32", "shape": [6, 30], "data_offsets": [0, 72]}},
        {"__metadata__": {"a": 1}, "input": {"dtype": "F32", "shape": [6, 3], "data_offsets": [0, 72]}},
    ],
)
def test_malformed_safetensors_headers_are_invalid_input(tmp_path, header):
    raw = json.dumps(header).encode()
    path = _write(tmp_path, struct.pack("<Q", len(raw)) + raw + bytes(72))

    with pytest.raises(InvalidInput) as refused:
        _inspect(path)
    assert refused.value.code == "dataset_invalid"


def test_an_npz_whose_header_claims_more_than_it_holds_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }".ljust(118) + b"\n"
        archive.writestr("input.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16))

    with pytest.raises(InvalidInput, match="holds 16 bytes"):
        _inspect(_write(tmp_path, buffer.getvalue()))
