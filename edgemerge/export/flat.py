"""Flat image for FPGA-style targets: one little-endian file a C program can use without parsing
JSON -- fixed header, fixed-size tensor table, a names blob, then aligned sections. Spec:
docs/format.md, "Flat image". The reader here and the C applier (``edgemerge/devices/c``) check
every field before use; ``rebuild`` is the numpy reference the C applier must match bit for bit.

Value encodings for θ0 and τ_MTL: ``F32``; ``F16``; ``Q16`` = int16 with a per-tensor number of
fraction bits f (value = q · 2^-f, f chosen per tensor as the largest that fits max|x|; the
quantization error is reported). Masks are the bundle's packed bits (big bit order).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError, unknown_name
from ..io import atomic_output, refuse_inputs
from ..runtime.bundle import Bundle, open_bundle
from ..runtime.dtypes import DTYPES

MAGIC = b"EMFLAT\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sIIIIIIQQQQ")          # 64 bytes, see docs/format.md
ENTRY = struct.Struct("<IIIIQQQiIII8I8x")        # 96 bytes
TASK = struct.Struct("<II")                      # name offset, name length in the names blob
NONE = 0xFFFFFFFF
KINDS = {"base": 0, "vector": 1, "mask": 2, "private": 3}
CODES = {"F32": 0, "F16": 1, "Q16": 2, "U8": 3, "I64": 4, "I32": 5, "F64": 6, "I8": 7, "BOOL": 8, "I16": 9,
         "BF16": 10, "U16": 11, "U32": 12, "U64": 13}
CODE_DTYPE = {CODES[n]: DTYPES[n] for n in CODES if n != "Q16"} | {CODES["Q16"]: np.dtype("<i2")}
ENCODINGS = ("F32", "F16", "Q16")
MAX_DIMS = 8
assert HEADER.size == 64 and ENTRY.size == 96


@dataclass(frozen=True)
class Entry:
    kind: int
    dtype: int
    task: int
    param: int
    offset: int
    nbytes: int
    numel: int
    frac_bits: int
    shape: tuple[int, ...]
    name: str


def q16(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Fixed point: the largest f in [0, 30] with max|x|·2^f ≤ 32767; round to nearest."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    f = 30 if m == 0 else max(0, min(30, math.floor(math.log2(32767 / m))))
    while f > 0 and np.max(np.abs(np.rint(x.astype(np.float64) * 2.0 ** f))) > 32767:
        f -= 1
    return np.clip(np.rint(x.astype(np.float64) * 2.0 ** f), -32768, 32767).astype("<i2"), f


def dequant(q: np.ndarray, f: int) -> np.ndarray:
    """Exact in float32: an int16 times a power of two."""
    return q.astype(np.float32) * np.float32(2.0 ** -f)


def _encode(x: np.ndarray, enc: str, name: str = "") -> tuple[np.ndarray, int, int]:
    if enc == "Q16":
        if not np.isfinite(x).all():
            raise ConfigError(f"tensor {name!r} holds NaN/Inf, which Q16 fixed point cannot encode; use --encoding F32 or F16")
        q, f = q16(x.astype(np.float32))
        return q, CODES["Q16"], f
    return x.astype("<f4" if enc == "F32" else "<f2"), CODES[enc], 0


def write_flat(bundle: Bundle | str, path: str, encoding: str = "F32", align: int = 64) -> dict[str, dict[str, float]]:
    """Write the flat image; returns per-tensor quantization error (max abs, rms) of θ0 and τ."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"flat image encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if align not in (64, 4096):
        raise ConfigError("flat image alignment must be 64 or 4096 bytes")
    b = open_bundle(bundle) if isinstance(bundle, str) else bundle
    refuse_inputs(path, [b.path], "bundle")
    other = {t: c for t, c in b.codecs.items() if not c.plain_tall}
    if other:
        raise ConfigError(f"{b.path}: the flat image (v1) holds TALL masks only; task(s) "
                          + ", ".join(f"{t} ({c.name}{' + scale' if c.scale != 'none' else ''}"
                                      f"{' + correction' if c.correction else ''})" for t, c in other.items())
                          + " need another codec: re-encode them as tall (no scale, no correction) for this target, or serve "
                          "them with TaskSession / TorchTaskModel")
    pieces: list[tuple[int, int, int, int, int, np.ndarray, str, tuple]] = []  # kind,dtype,task,param,frac,data,name,shape
    errors: dict[str, dict[str, float]] = {}
    for p in b.params:
        i = len(pieces)  # the table index of this param's base entry; vector and masks point at it
        if p.role == "carried":
            pieces.append((KINDS["base"], CODES[p.dtype], NONE, i, 0, np.asarray(b.base(p.name)), p.name, p.shape))
            continue
        for kind, src in (("base", b.base(p.name)), ("vector", b.vector(p.name))):
            x = np.asarray(src).astype(np.float32)
            data, code, f = _encode(x, encoding, f"{kind}/{p.name}")
            back = dequant(data, f) if code == CODES["Q16"] else data.astype(np.float32)
            err = np.abs(back.astype(np.float64) - x)
            errors[f"{kind}/{p.name}"] = {"max_abs": float(err.max()) if err.size else 0.0,
                                          "rms": float(np.sqrt(np.mean(err ** 2))) if err.size else 0.0}
            pieces.append((KINDS[kind], code, NONE, i, f, data, p.name, p.shape))
        for t, task in enumerate(b.tasks):
            packed = b.packed_mask(task, p.name)
            if packed is not None:
                pieces.append((KINDS["mask"], CODES["U8"], t, i, 0, np.asarray(packed), p.name, (packed.size,)))
    for t, task in enumerate(b.tasks):
        for k, v in b.private(task).items():
            x = np.asarray(v)
            pieces.append((KINDS["private"], CODES[_code_name(x)], t, NONE, 0, x, k, x.shape))
    _write(path, b.tasks, pieces, align)
    return errors


def _code_name(x: np.ndarray) -> str:
    for name, dt in DTYPES.items():
        if dt == x.dtype and name in CODES:
            return name
    raise ConfigError(f"dtype {x.dtype} cannot be stored in a flat image")


def _write(path: str, tasks, pieces, align: int) -> None:
    names = bytearray()
    task_rows = []
    for t in tasks:
        raw = t.encode()
        task_rows.append(TASK.pack(len(names), len(raw)))
        names += raw
    name_pos = []
    for *_, name, _shape in pieces:
        raw = name.encode()
        name_pos.append((len(names), len(raw)))
        names += raw
    table_off = HEADER.size
    tasks_off = table_off + ENTRY.size * len(pieces)
    names_off = tasks_off + TASK.size * len(tasks)
    cursor = _up(names_off + len(names), align)
    rows, offsets = [], []
    for (kind, code, task, param, frac, data, name, shape), (noff, nlen) in zip(pieces, name_pos):
        if len(shape) > MAX_DIMS:
            raise ConfigError(f"tensor {name!r} has {len(shape)} dims; the flat image holds at most {MAX_DIMS}")
        offsets.append(cursor)
        dims = list(shape) + [0] * (MAX_DIMS - len(shape))
        rows.append(ENTRY.pack(kind, code, task, param, cursor, data.nbytes, data.size, frac, len(shape), noff, nlen, *dims))
        cursor = _up(cursor + data.nbytes, align)
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, align, len(pieces), len(tasks), 0,
                         table_off, names_off, len(names), cursor)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(header + b"".join(rows) + b"".join(task_rows) + bytes(names))
        for off, piece in zip(offsets, pieces):
            f.write(b"\0" * (off - f.tell()))
            f.write(np.ascontiguousarray(piece[5]).tobytes())
        f.write(b"\0" * (cursor - f.tell()))


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


# -- reading (validating) and the numpy reference rebuild ---------------------------------------


def read_flat(path: str) -> tuple[list[str], list[Entry], bytes]:
    """Parse and check everything; FormatError names the entry. Returns (tasks, entries, data).

    The rules are exactly those of the C applier's ``parse`` (edgemerge/devices/c/emflat.c), so
    the two accept the same images (fuzzed against each other in tests/test_flat_differential.py).
    """
    with open(path, "rb") as f:
        data = f.read()

    def bad(msg: str) -> FormatError:
        return FormatError(f"{path}: {msg}")

    if len(data) < HEADER.size:
        raise bad(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, hsize, align, n, n_tasks, _flags, table_off, names_off, names_len, size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise bad("not an edgemerge flat image (bad magic)")
    if version != VERSION or hsize != HEADER.size:
        raise bad(f"unsupported version {version} / header size {hsize}")
    if align not in (64, 4096) or size != len(data):
        raise bad(f"alignment {align} or declared size {size} does not match the file ({len(data)} bytes)")
    tasks_off = table_off + ENTRY.size * n
    if table_off != HEADER.size or n > 1 << 20 or n_tasks > 1 << 16 or tasks_off + TASK.size * n_tasks != names_off \
            or names_off + names_len > len(data):
        raise bad("tensor table, task table or names blob out of bounds")
    names = data[names_off:names_off + names_len]
    raw_tasks = []
    for t in range(n_tasks):
        off, ln = TASK.unpack_from(data, tasks_off + TASK.size * t)
        if off + ln > names_len or ln == 0:
            raise bad(f"task {t}: name out of bounds")
        if 0 in names[off:off + ln]:
            raise bad(f"task {t}: name holds a NUL byte")
        raw_tasks.append(names[off:off + ln])
    entries, raw_names = [], []
    for i in range(n):
        kind, code, task, param, off, nbytes, numel, frac, ndim, noff, nlen, *dims = ENTRY.unpack_from(data, table_off + ENTRY.size * i)
        if kind > 3 or code not in CODE_DTYPE or ndim > MAX_DIMS:
            raise bad(f"entry {i}: bad kind {kind}, dtype code {code} or ndim {ndim}")
        if noff + nlen > names_len:
            raise bad(f"entry {i}: name out of bounds")
        raw_names.append(names[noff:noff + nlen])
        where = f"entry {i} ({raw_names[-1].decode('utf-8', 'replace')!r})"
        count = 1
        for d in dims[:ndim]:  # the C applier's u64 product, checked in the same order
            if d and count > U64_MAX // d:
                raise bad(f"{where}: shape overflows")
            count *= d
        if count != numel or numel > U64_MAX // 8 or numel * np.dtype(CODE_DTYPE[code]).itemsize != nbytes:
            raise bad(f"{where}: shape {tuple(dims[:ndim])}, numel {numel} and {nbytes} bytes disagree")
        if off % align or off < names_off + names_len or off + nbytes > len(data):
            raise bad(f"{where}: data at {off}+{nbytes} is misaligned or outside the file")
        if (task != NONE and task >= n_tasks) or (kind in (2, 3)) != (task != NONE):
            raise bad(f"{where}: task index {task} invalid for its kind")
        if not (0 <= frac <= 30):
            raise bad(f"{where}: fraction bits {frac} out of range")
        entries.append(Entry(kind, code, task, param, off, nbytes, numel, frac, tuple(dims[:ndim]),
                             raw_names[-1].decode("utf-8", "surrogateescape")))  # distinct bytes, distinct names
    _check_links(entries, raw_names, bad)
    _check_unique(entries, raw_names, raw_tasks, bad)
    return [t.decode("utf-8", "surrogateescape") for t in raw_tasks], entries, data


U64_MAX = (1 << 64) - 1
FLOAT_CODES = (CODES["F32"], CODES["F16"], CODES["Q16"])


def _check_links(entries: list[Entry], raw_names: list[bytes], bad) -> None:
    """A vector or mask points at a base of the same name; a vector matches its base's element
    count and both are F32/F16/Q16; a mask is U8 of ceil(numel / 8) bytes."""
    for i, e in enumerate(entries):
        if e.kind not in (1, 2):
            continue
        where = f"entry {i} ({raw_names[i].decode('utf-8', 'replace')!r})"
        if e.param >= len(entries) or entries[e.param].kind != 0:
            raise bad(f"{where}: param index {e.param} does not point at a base entry")
        b = entries[e.param]
        if raw_names[i] != raw_names[e.param]:
            raise bad(f"{where}: name differs from its base's")
        if e.kind == 1 and (e.numel != b.numel or e.dtype not in FLOAT_CODES or b.dtype not in FLOAT_CODES):
            raise bad(f"{where}: vector does not match its base (same element count, F32/F16/Q16 both)")
        if e.kind == 2 and (e.dtype != CODES["U8"] or e.nbytes != (b.numel + 7) // 8):
            raise bad(f"{where}: mask has {e.nbytes} bytes of code {e.dtype}; {b.numel} elements need {(b.numel + 7) // 8} U8")


def _check_unique(entries: list[Entry], raw_names: list[bytes], raw_tasks: list[bytes], bad) -> None:
    """Non-empty sections never overlap; task names, base names, a param's vector and a
    (param, task)'s mask are each unique."""
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.nbytes)
    if any(s1 < e0 for (_s0, e0), (s1, _e1) in zip(spans, spans[1:])):
        raise bad("sections overlap")
    bases = [raw_names[i] for i, e in enumerate(entries) if e.kind == 0]
    if len(set(bases)) != len(bases):
        raise bad("two base entries share a name")
    links = [(e.kind, e.param, e.task) for e in entries if e.kind in (1, 2)]
    if len(set(links)) != len(links):
        raise bad("a param has two vectors, or two masks for one task")
    if len(set(raw_tasks)) != len(raw_tasks):
        raise bad("two tasks share a name")


def _values(e: Entry, data: bytes) -> np.ndarray:
    raw = np.frombuffer(data, dtype=CODE_DTYPE[e.dtype], count=e.numel, offset=e.offset)
    if e.dtype == CODES["Q16"]:
        return dequant(raw, e.frac_bits)
    return raw.astype(np.float32) if e.dtype in (0, 1) else raw


def rebuild(path: str, task: str) -> dict[str, np.ndarray]:
    """θ_t of every merged param (float32, flat) -- the reference for the C applier."""
    tasks, entries, data = read_flat(path)
    if task not in tasks:
        raise ConfigError(unknown_name("task", task, tasks))
    t = tasks.index(task)
    vec = {e.param: e for e in entries if e.kind == 1}
    mask = {e.param: e for e in entries if e.kind == 2 and e.task == t}
    out = {}
    for i, e in enumerate(entries):
        if e.kind != 0 or i not in vec:
            continue
        base, v = _values(e, data), _values(vec[i], data)
        bits = np.ones(e.numel, bool) if i not in mask else np.unpackbits(
            np.frombuffer(data, np.uint8, mask[i].nbytes, mask[i].offset), count=e.numel).view(bool)
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf in a hand-made image is NaN, as in C
            out[e.name] = np.where(bits, base + v, base).astype(np.float32)
    return out
