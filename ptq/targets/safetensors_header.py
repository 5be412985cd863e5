"""Read and validate a ``.safetensors`` header without loading the tensors.

A safetensors file is: 8-byte little-endian ``N``, ``N`` bytes of UTF-8 JSON (``{name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}``), then the data section. Offsets are relative to the data
section and must tile it exactly, in order, with no gaps, overlaps or trailing bytes (that is what the
``safetensors`` library itself enforces, so a file that fails here will not load in ComfyUI/diffusers either).

Everything here is bounded by the file's real size: a declared length is never used to allocate or loop.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "HeaderError",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorReader",
    "bytes_to_tensor",
    "read_header",
    "read_tensor",
    "read_tensor_bytes",
    "torch_dtype",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header accepted (the Rust ``safetensors`` library uses the same 100 MB limit)."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of every dtype string the safetensors format defines."""

_TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}


class HeaderError(ValueError):
    """A safetensors file whose header cannot be read or is invalid; the message names the file."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype string (``"F8_E4M3"``), shape, and byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        """Number of elements as declared by the shape (for ``F4``, 4-bit elements)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    """A validated header: tensors in file order, string metadata, and where the data section starts."""

    path: str
    file_size: int
    header_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data section."""
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        """Size of the data section in bytes."""
        return self.file_size - self.data_start


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string (raises ``KeyError`` when torch has none)."""
    name = _TORCH_DTYPES.get(dtype)
    if dtype == "F4":
        name = "float4_e2m1fn_x2"
    attr = getattr(torch, name, None) if name else None
    if attr is None:
        raise KeyError(f"no torch dtype for safetensors dtype {dtype!r}")
    return attr


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in header JSON")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: str, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(path, f"tensor {name!r}: entry is {type(entry).__name__}, expected an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise HeaderError(path, f"tensor {name!r}: entry is missing {', '.join(missing)}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(
            path, f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BITS))})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(
            path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with begin <= end"
        )
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    bits = info.numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != info.nbytes:
        raise HeaderError(
            path,
            f"tensor {name!r}: data_offsets {offsets} span {info.nbytes} bytes but dtype {dtype} x shape "
            f"{list(shape)} needs {bits / 8:g} bytes",
        )
    return info


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and fully validate the header of ``path``; raises :class:`HeaderError` on any problem."""
    spath = str(path)
    try:
        with open(spath, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise HeaderError(
                    spath,
                    f"file is {file_size} bytes, shorter than the 8-byte header length: not a safetensors file",
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise HeaderError(
                    spath,
                    f"declared header length {n:,} bytes exceeds the {MAX_HEADER_BYTES:,}-byte limit "
                    "(corrupt file or not a safetensors file)",
                )
            if 8 + n > file_size:
                raise HeaderError(
                    spath,
                    f"truncated: header declares {n:,} bytes but the file has only {file_size - 8:,} after the "
                    "length field",
                )
            raw = f.read(n)
    except HeaderError:
        raise
    except OSError as e:
        raise HeaderError(spath, f"cannot read file: {e.strerror or e}") from None
    if len(raw) != n:
        raise HeaderError(spath, f"short read: expected {n:,} header bytes, got {len(raw):,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(
            spath, f"header is not valid UTF-8 (byte {e.start}): not a safetensors file"
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as e:
        raise HeaderError(spath, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError(spath, f"header JSON is a {type(obj).__name__}, expected an object")

    metadata_obj = obj.pop("__metadata__", {})
    if metadata_obj is None:
        metadata_obj = {}
    if not isinstance(metadata_obj, dict):
        raise HeaderError(spath, "__metadata__ is not an object")
    bad = [k for k, v in metadata_obj.items() if not isinstance(v, str)]
    if bad:
        raise HeaderError(
            spath, f"__metadata__ values must be strings; {bad[0]!r} is {type(metadata_obj[bad[0]]).__name__}"
        )

    tensors = {name: _parse_entry(spath, name, entry) for name, entry in obj.items()}
    data_size = file_size - 8 - n
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < pos:
            raise HeaderError(
                spath,
                f"tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] overlap a previous tensor",
            )
        if info.begin > pos:
            raise HeaderError(
                spath,
                f"tensor {info.name!r}: gap of {info.begin - pos} bytes before data_offsets {info.begin}",
            )
        if info.end > data_size:
            raise HeaderError(
                spath,
                f"truncated data section: tensor {info.name!r} ends at byte {info.end:,} but the data section "
                f"has only {data_size:,} bytes",
            )
        pos = info.end
    if pos != data_size:
        raise HeaderError(
            spath,
            f"data section has {data_size - pos:,} trailing bytes after the last tensor (ends at {pos:,})",
        )
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))
    return SafetensorsHeader(spath, file_size, n, ordered, dict(metadata_obj))


class TensorReader:
    """Reads single tensors of one file by offset, keeping the file open (``with TensorReader(...) as r:``)."""

    def __init__(self, path: str | os.PathLike[str], header: SafetensorsHeader) -> None:
        self.path = str(path)
        self.header = header
        self._f: BinaryIO | None = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_bytes(self, name: str, max_bytes: int = 256 * 1024 * 1024) -> bytes:
        """The raw bytes of tensor ``name`` (nothing else is read)."""
        info = self.header.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if info.nbytes > max_bytes:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {info.nbytes:,} bytes, over max_bytes={max_bytes:,}"
            )
        try:
            if self._f is None:
                self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
            self._f.seek(self.header.data_start + info.begin)
            data = self._f.read(info.nbytes)
        except OSError as e:
            raise HeaderError(self.path, f"cannot read tensor {name!r}: {e.strerror or e}") from None
        if len(data) != info.nbytes:
            raise HeaderError(
                self.path,
                f"tensor {name!r}: short read ({len(data)} of {info.nbytes} bytes); file truncated?",
            )
        return data

    def tensor(self, name: str, max_bytes: int = 256 * 1024 * 1024) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor with the header's dtype and shape."""
        info = self.header.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return bytes_to_tensor(self.read_bytes(name, max_bytes), info)


def bytes_to_tensor(data: bytes, info: TensorInfo) -> torch.Tensor:
    """Interpret raw little-endian bytes as the tensor described by ``info``."""
    dtype = torch_dtype(info.dtype)
    shape = list(info.shape)
    if info.dtype == "F4":  # header counts 4-bit elements; torch's float4_e2m1fn_x2 holds two per byte
        if not shape or shape[-1] % 2:
            return (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )
        shape[-1] //= 2
    if not data:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def read_tensor_bytes(
    path: str | os.PathLike[str], header: SafetensorsHeader, name: str, max_bytes: int = 256 * 1024 * 1024
) -> bytes:
    """The raw bytes of one tensor, read by offset (nothing else is read)."""
    with TensorReader(path, header) as reader:
        return reader.read_bytes(name, max_bytes)


def read_tensor(
    path: str | os.PathLike[str], header: SafetensorsHeader, name: str, max_bytes: int = 256 * 1024 * 1024
) -> torch.Tensor:
    """Load one tensor (e.g. a scale) by seeking to its offset; returns a CPU tensor of the header's dtype/shape.

    Handles every dtype torch has (F8_E4M3 -> float8_e4m3fn, U8, F32, BF16, F16, ...); raises ``KeyError`` for
    an unknown name, ``ValueError`` when the tensor is larger than ``max_bytes``.
    """
    with TensorReader(path, header) as reader:
        return reader.tensor(name, max_bytes)
