"""models/: read a GGUF file's header (metadata values and the tensor table) without touching its weights.

Why not ``gguf.GGUFReader``: it parses every metadata array into numpy views, one per element. For SmolLM2's
49,152 tokenizer strings and 48,900 merges that took 10-17 s and held 160 MB of RSS, to read a dozen numbers.
Here arrays of strings are skipped over (only their length is kept) and small numeric arrays are read. The
format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor count, metadata count,
metadata key/value pairs, tensor infos (name, dims, type, offset), padding to the alignment, tensor data.
The block sizes of the formats slimswarm de-quantizes itself are below; every other tensor type is looked up in
the ``gguf`` package, which is then imported (a few MB of resident modules: yaml, sentencepiece, its writer).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
SMALL_ARRAY = 4096  # numeric arrays up to this length are read (per-layer head counts and such); longer: length


@dataclass(frozen=True)
class GGMLType:
    """A tensor type of the file: ggml's number and name (``gguf.GGMLQuantizationType(value)`` is the same type)."""

    value: int
    name: str


# ggml type number -> (name, values per block, bytes per block); tests/test_load_memory.py checks them against gguf's
KNOWN_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34),
               30: ("BF16", 1, 2)}


def _type_info(ttype: int) -> tuple[GGMLType, int, int]:
    known = KNOWN_TYPES.get(ttype)
    if known is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(ttype)  # ValueError for a number ggml does not have
        known = (qtype.name, *GGML_QUANT_SIZES[qtype])
    name, block, type_size = known
    return GGMLType(ttype, name), block, type_size


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in the file; the weights are read later, one at a time."""

    name: str
    tensor_type: GGMLType
    shape: tuple[int, ...]  # torch order (rows first)
    data_offset: int  # from the start of the file
    n_bytes: int


@dataclass
class GGUFArray:
    """A long or string array left unread: its element type and length."""

    type: int
    count: int

    def __len__(self) -> int:
        return self.count


class _Cursor:
    def __init__(self, buf, endian: str):
        self.buf, self.pos, self.e = buf, 0, endian

    def take(self, fmt: str):
        v = struct.unpack_from(self.e + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(self.e + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos : self.pos + n])
        if len(s) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self.take("I"), self.take("Q")
        if etype in _SCALARS and count <= SMALL_ARRAY:
            f = _SCALARS[etype]
            vals = list(struct.unpack_from(f"{self.e}{count}{f}", self.buf, self.pos))
            self.pos += count * struct.calcsize(f)
            return vals
        if etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
        elif etype == _STRING:
            for _ in range(count):
                self.pos += 8 + struct.unpack_from(self.e + "Q", self.buf, self.pos)[0]
        else:
            for _ in range(count):  # nested arrays: rare; walk them
                self.value(etype)
        return GGUFArray(etype, count)


def read_header(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata {key: value}, tensor table). Raises ValueError on anything that is not a well-formed GGUF."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(f"{size} bytes is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(f"bad magic {bytes(buf[:4])!r}")
            version = struct.unpack_from("<I", buf, 4)[0]
            endian = "<" if version & 0xFFFF else ">"  # a byte-swapped version means a big-endian file
            c = _Cursor(buf, endian)
            c.pos = 4
            version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                meta[key] = c.value(c.take("I"))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.take("Q") for _ in range(c.take("I"))]
                infos.append((name, dims, c.take("I"), c.take("Q")))
            align = int(meta.get("general.alignment", 32))
            if align <= 0 or align & (align - 1):
                raise ValueError(f"invalid alignment {align}")
            start = -(-c.pos // align) * align
    table = []
    for name, dims, ttype, offset in infos:
        qtype, block, type_size = _type_info(ttype)
        n = 1
        for d in dims:
            n *= d
        n_bytes = n // block * type_size
        if start + offset + n_bytes > size:
            raise ValueError(f"tensor {name!r} runs past the end of the file ({size} bytes)")
        table.append(GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), start + offset, n_bytes))
    return meta, table
