"""A safetensors header reader that distrusts the file.

Layout (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian u64 ``N``,
then ``N`` bytes of UTF-8 JSON (may end in spaces), then the data buffer. Every number the file
supplies is checked before use, and each failure names the file and tensor:

- ``N`` is at most ``MAX_HEADER_BYTES`` and ``8 + N`` fits in the file;
- the header is a JSON object; ``__metadata__`` (optional) maps strings to strings;
- every tensor has a known dtype, a shape of non-negative ints, and ``data_offsets [b, e]`` with
  ``e - b == numel * itemsize``;
- tensors tile the data buffer exactly: sorted by offset they start at 0, never overlap or leave
  gaps, and the last one ends at the end of the file;
- names are non-empty and free of control characters.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from .dtypes import DTYPES

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap (MAX_HEADER_SIZE), not 100 MiB
MAX_DIMS = 64                    # numpy's
MAX_ARRAY_BYTES = (1 << 63) - 1
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: byte range relative to the start of the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int  # absolute file offset of the data buffer
    file_size: int


def parse_json(text: str | bytes, where: str, strict: bool = False):
    """JSON from a file, or a FormatError naming ``where``: malformed, nested past the parser's
    depth, an integer of more than 4,300 digits, or (``strict``) NaN/Infinity."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not strict JSON")

    try:
        return json.loads(text, parse_constant=no_constant) if strict else json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{where} is not valid JSON ({str(exc)[:100] or type(exc).__name__})") from None


def bad_name(name: str) -> bool:
    """Empty, a control character, or not encodable as UTF-8 (a lone surrogate)."""
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_entry(path: str, name: str, raw: object) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if bad_name(name):
        raise FormatError(f"{where}: empty name or control characters in the name")
    if not isinstance(raw, dict) or set(raw) - {"dtype", "shape", "data_offsets"} or len(raw) != 3:
        raise FormatError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {str(dtype)[:40]!r}; valid: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {str(shape)[:80]}")
    nonzero = math.prod(d for d in shape if d)
    if len(shape) > MAX_DIMS or nonzero * DTYPES[dtype].itemsize > MAX_ARRAY_BYTES:
        # numpy's limits: 64 dims, and a size that fits in a signed 64-bit count even where a dim is 0
        raise FormatError(f"{where}: shape with {len(shape)} dims and {nonzero:.3g} elements is beyond what an array can hold")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {nbytes}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(path: str, prefix: bytes, file_size: int) -> Header:
    """Validate the header held in ``prefix`` (the file's first ``8 + N`` bytes or more)."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"{path}: file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header claims {n} bytes, more than the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size:
        raise FormatError(f"{path}: header claims {n} bytes but the file has only {file_size - 8} after the size")
    if len(prefix) < 8 + n:
        raise FormatError(f"{path}: header truncated")
    text = prefix[8 : 8 + n]
    if not text.startswith(b"{"):  # the safetensors library refuses anything else, leading spaces included
        raise FormatError(f"{path}: header must start with '{{'")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({exc})") from None
    doc = parse_json(text, f"{path}: header (UTF-8 JSON)")
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    metadata = doc.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, raw) for name, raw in doc.items()}
    data_start, data_size = 8 + n, file_size - 8 - n
    cursor = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            what = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap before it"
            raise FormatError(f"{path}: tensor {entry.name!r} at byte {entry.start} {what} (expected {cursor})")
        cursor = entry.end
    if cursor != data_size:
        raise FormatError(
            f"{path}: tensors cover {cursor} bytes but the data buffer holds {data_size} (truncated or trailing bytes)"
        )
    return Header(path, metadata, tensors, data_start, file_size)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file without touching the data."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(path, head, size)


def map_file(path: str | os.PathLike) -> mmap.mmap | None:
    """Read-only memory map of a whole file (None for an empty file)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def tensor_view(buf: mmap.mmap | bytes, header: Header, name: str) -> np.ndarray:
    """Zero-copy, read-only numpy view of one tensor of a validated header."""
    e = header.tensors[name]
    arr = np.frombuffer(buf, dtype=DTYPES[e.dtype], count=e.numel, offset=header.data_start + e.start)
    return arr.reshape(e.shape)


def read_tensor(f, header: Header, name: str) -> np.ndarray:
    """Copy one tensor out of an open file with positional reads (keeps RSS to this tensor)."""
    e = header.tensors[name]
    out = np.empty(e.shape, dtype=DTYPES[e.dtype])
    view = memoryview(out.reshape(-1).view(np.uint8))
    done, total = 0, e.end - e.start
    while done < total:  # one pread returns at most ~2 GiB on Linux
        got = os.preadv(f.fileno(), [view[done:]], header.data_start + e.start + done)
        if got <= 0:
            raise FormatError(f"{header.path}: tensor {name!r} truncated while reading ({done} of {total} bytes)")
        done += got
    return out
