"""A GGUF file's header alone: its metadata and tensor names, read without touching the
tensors. The gguf package's GGUFReader maps every field and tensor of the file, seconds for a
tokenizer of 49,152 tokens; the model's shape needs a few scalars of the header.

GGUF (version 2 or 3, little-endian): "GGUF", version u32, tensor count u64, metadata count
u64, then each metadata key (a string: u64 length, UTF-8 bytes), its value type u32 and value,
then each tensor's name, dimension count u32, dimensions u64 each, type u32 and offset u64.
"""

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS = {  # value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass(frozen=True)
class GGUFHeader:
    """metadata: key -> value; an array's value is its length (the shape needs no more)."""

    metadata: dict[str, Any]
    tensor_names: frozenset[str]


def read_gguf_header(path: str) -> GGUFHeader:
    """The header of the GGUF file at path; a ValueError naming it if it is not one."""
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = _read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (have 2, 3)")
        num_tensors, num_metadata = _read(f, "<QQ")
        metadata = {}
        for _ in range(num_metadata):
            key = _read_string(f)
            (kind,) = _read(f, "<I")
            metadata[key] = _read_value(f, kind, path)
        names = []
        for _ in range(num_tensors):
            names.append(_read_string(f))
            (num_dims,) = _read(f, "<I")
            f.seek(8 * num_dims + 4 + 8, 1)  # dimensions, type, offset
    return GGUFHeader(metadata, frozenset(names))


def _read(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{f.name}: the GGUF header ends early")
    return struct.unpack(fmt, data)


def _read_string(f: BinaryIO) -> str:
    (length,) = _read(f, "<Q")
    data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{f.name}: the GGUF header ends early")
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int, path: str) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _read_string(f)
    if kind != _ARRAY:
        raise ValueError(f"{path}: unknown GGUF value type {kind}")
    item_kind, length = _read(f, "<IQ")
    if item_kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[item_kind]) * length, 1)
    else:  # strings (each its own length) or nested arrays: walk them
        for _ in range(length):
            _read_value(f, item_kind, path)
    return length
