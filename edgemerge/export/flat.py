"""Flat image for FPGA-style targets: one little-endian file a C program can use without parsing
JSON -- fixed header, fixed-size tensor table, a names blob, then aligned sections. Spec:
docs/format.md, "Flat image". The reader here and the C applier (``edgemerge/devices/c``) check
every field before use; ``rebuild`` is the numpy reference the C applier must match bit for bit.

Value encodings for θ0 and the shared vectors (τ_MTL, EMR's elected u): ``F32``; ``F16``; ``Q16``
= int16 with a per-tensor number of fraction bits f (value = q · 2^-f, f chosen per tensor as the
largest that fits max|x|; the quantization error is reported). Masks are the bundle's packed bits
(big bit order).

Version 1 holds TALL tasks only; version 2 (written when any task uses another codec) adds a codec
per task record and the entries the per-task codecs need -- sign planes, scales, δ, corrections --
with one float32 rule per codec (docs/format.md, "Flat image, version 2").
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError, unknown_name
from ..io import atomic_output, refuse_inputs
from ..runtime.bundle import Bundle, open_bundle
from ..runtime.codecs import quant_rows, unpack_nibbles
from ..runtime.dtypes import DTYPES

MAGIC = b"EMFLAT\x00\x01"
VERSIONS = (1, 2)
HEADER = struct.Struct("<8sIIIIIIQQQQ")          # 64 bytes, see docs/format.md
ENTRY = struct.Struct("<IIIIQQQiIII8II4x")       # 96 bytes; v2 uses the u32 at 88 ("round"), v1 leaves it 0
TASK = struct.Struct("<II")                      # v1: name offset, name length in the names blob
TASK2 = struct.Struct("<IIII")                   # v2: + codec, delta dtype code (NONE unless delta)
NONE = 0xFFFFFFFF
KINDS = {"base": 0, "vector": 1, "mask": 2, "private": 3,
         "elected": 4, "sign": 5, "scale": 6, "delta": 7, "fixpos": 8, "fixval": 9}  # 4-9: version 2
PER_TASK = (2, 3, 5, 6, 7, 8, 9)                 # kinds that belong to one task
LINKED = (1, 2, 4, 5, 6, 7, 8, 9)                # kinds that point at a base entry, unique per (kind, param, task)
TASK_CODECS = {"tall": 0, "tall-scaled": 1, "tswitch": 2, "delta": 3, "emr": 4}
CODES = {"F32": 0, "F16": 1, "Q16": 2, "U8": 3, "I64": 4, "I32": 5, "F64": 6, "I8": 7, "BOOL": 8, "I16": 9,
         "BF16": 10, "U16": 11, "U32": 12, "U64": 13}
I4 = 14                                          # a delta dtype code of v2 task records only: two codes per byte
DELTA_CODES = (CODES["F32"], CODES["F16"], CODES["BF16"], CODES["I8"], I4)
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
    round: int = 0  # v2 merged base: the dtype θ_t is rounded to (0 F32: none, 1 F16, 10 BF16)


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
    """Write the flat image; returns per-tensor quantization error (max abs, rms) of θ0 and the
    shared vectors. Version 1 when every task is plain TALL (what v1 appliers read), else 2."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"flat image encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if align not in (64, 4096):
        raise ConfigError("flat image alignment must be 64 or 4096 bytes")
    b = open_bundle(bundle) if isinstance(bundle, str) else bundle
    refuse_inputs(path, [b.path], "bundle")
    version = 1 if all(c.plain_tall for c in b.codecs.values()) else 2
    task_codes = [_task_code(b, t) for t in b.tasks]
    shared = any(c.shared for c in b.codecs.values())
    elected = any(c.name == "emr" for c in b.codecs.values())
    pieces: list[tuple] = []  # kind, dtype, task, param, frac, data, name, shape, round
    errors: dict[str, dict[str, float]] = {}

    def add(kind: str, data: np.ndarray, p, task: int = NONE, param: int = NONE, code: int | None = None) -> None:
        data = np.ascontiguousarray(data)
        pieces.append((KINDS[kind], CODES[_code_name(data)] if code is None else code, task, param, 0, data.reshape(-1)
                       if kind != "base" else data, p.name, data.shape if kind in ("base", "private") else (data.size,), 0))

    for p in b.params:
        i = len(pieces)  # the table index of this param's base entry; everything else of the param points at it
        if p.role == "carried":
            add("base", np.asarray(b.base(p.name)), p, param=i)
            continue
        for kind, on in (("base", True), ("vector", shared), ("elected", elected)):
            if not on:
                continue
            src = b.base(p.name) if kind == "base" else b.vector(p.name) if kind == "vector" else b.elected_vector(p.name)
            x = np.asarray(src).astype(np.float32)
            data, code, f = _encode(x, encoding, f"{kind}/{p.name}")
            back = dequant(data, f) if code == CODES["Q16"] else data.astype(np.float32)
            err = np.abs(back.astype(np.float64) - x)
            errors[f"{kind}/{p.name}"] = {"max_abs": float(err.max()) if err.size else 0.0,
                                          "rms": float(np.sqrt(np.mean(err ** 2))) if err.size else 0.0}
            rounding = CODES[p.dtype] if kind == "base" and version == 2 and p.dtype in ROUNDINGS else 0
            pieces.append((KINDS[kind], code, NONE, i, f, data, p.name, p.shape, rounding))
        for t, task in enumerate(b.tasks):
            if version == 1:
                packed = b.packed_mask(task, p.name)
                if packed is not None:
                    add("mask", packed, p, t, i)
                continue
            r = b.recipe(task, p.name)
            if r.presence is not None:
                add("mask", r.presence, p, t, i)
            if r.sign is not None:
                add("sign", r.sign, p, t, i)
            if b.codecs[task].has_scales:  # tall with a scale, tswitch, emr: one per param
                add("scale", np.array([r.scale], "<f4"), p, t, i)
            if r.kind == "delta":
                add("delta", r.delta, p, t, i, CODES["U8"] if r.packed4 else None)
                if r.qscale is not None:
                    add("scale", np.asarray(r.qscale, "<f4"), p, t, i)
            if r.fix_index is not None and r.fix_index.size:
                add("fixpos", np.asarray(r.fix_index, "<u8"), p, t, i)
                add("fixval", np.asarray(r.fix_value, np.float32).astype("<f2"), p, t, i)
    for t, task in enumerate(b.tasks):
        for k, v in b.private(task).items():
            x = np.asarray(v)
            pieces.append((KINDS["private"], CODES[_code_name(x)], t, NONE, 0, x, k, x.shape, 0))
    _write(path, b.tasks, task_codes if version == 2 else None, pieces, align)
    return errors


def _task_code(b: Bundle, task: str) -> tuple[int, int]:
    """(codec, delta dtype code) of a v2 task record."""
    c = b.codecs[task]
    if c.name == "delta":
        return TASK_CODECS["delta"], I4 if c.dtype == "I4" else CODES[c.dtype]
    return TASK_CODECS["tall-scaled" if c.name == "tall" and c.scale == "ls" else c.name], NONE


def _code_name(x: np.ndarray) -> str:
    for name, dt in DTYPES.items():
        if dt == x.dtype and name in CODES:
            return name
    raise ConfigError(f"dtype {x.dtype} cannot be stored in a flat image")


def _write(path: str, tasks, task_codes, pieces, align: int) -> None:
    """``task_codes``: None for a version 1 image, else (codec, delta code) per task (version 2)."""
    names = bytearray()
    task_rows = []
    for i, t in enumerate(tasks):
        raw = t.encode()
        task_rows.append(TASK.pack(len(names), len(raw)) if task_codes is None else TASK2.pack(len(names), len(raw), *task_codes[i]))
        names += raw
    name_pos = []
    for *_, name, _shape, _round in pieces:
        raw = name.encode()
        name_pos.append((len(names), len(raw)))
        names += raw
    table_off = HEADER.size
    tasks_off = table_off + ENTRY.size * len(pieces)
    names_off = tasks_off + (TASK if task_codes is None else TASK2).size * len(tasks)
    cursor = _up(names_off + len(names), align)
    rows, offsets = [], []
    for (kind, code, task, param, frac, data, name, shape, rounding), (noff, nlen) in zip(pieces, name_pos):
        if len(shape) > MAX_DIMS:
            raise ConfigError(f"tensor {name!r} has {len(shape)} dims; the flat image holds at most {MAX_DIMS}")
        offsets.append(cursor)
        dims = list(shape) + [0] * (MAX_DIMS - len(shape))
        rows.append(ENTRY.pack(kind, code, task, param, cursor, data.nbytes, data.size, frac, len(shape), noff, nlen, *dims,
                               rounding))
        cursor = _up(cursor + data.nbytes, align)
    header = HEADER.pack(MAGIC, 1 if task_codes is None else 2, HEADER.size, align, len(pieces), len(tasks), 0,
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


@dataclass(frozen=True)
class Image:
    version: int
    tasks: list[str]
    codecs: list[tuple[int, int]]   # per task (codec, delta dtype code); v1: (tall, NONE)
    entries: list[Entry]
    data: bytes


def read_flat(path: str) -> tuple[list[str], list[Entry], bytes]:
    """Parse and check everything; FormatError names the entry. Returns (tasks, entries, data)."""
    im = read_image(path)
    return im.tasks, im.entries, im.data


def read_image(path: str) -> Image:
    """Parse and check everything (both versions); FormatError names the entry.

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
    if version not in VERSIONS or hsize != HEADER.size:
        raise bad(f"unsupported version {version} / header size {hsize} (this reader knows versions 1 and 2: "
                  "a newer image needs a newer edgemerge)")
    if align not in (64, 4096) or size != len(data):
        raise bad(f"alignment {align} or declared size {size} does not match the file ({len(data)} bytes)")
    row = TASK if version == 1 else TASK2
    tasks_off = table_off + ENTRY.size * n
    if table_off != HEADER.size or n > 1 << 20 or n_tasks > 1 << 16 or tasks_off + row.size * n_tasks != names_off \
            or names_off + names_len > len(data):
        raise bad("tensor table, task table or names blob out of bounds")
    names = data[names_off:names_off + names_len]
    raw_tasks, codecs = [], []
    for t in range(n_tasks):
        off, ln, *codec = row.unpack_from(data, tasks_off + row.size * t)
        if off + ln > names_len or ln == 0:
            raise bad(f"task {t}: name out of bounds")
        if 0 in names[off:off + ln]:
            raise bad(f"task {t}: name holds a NUL byte")
        codec = tuple(codec) or (TASK_CODECS["tall"], NONE)
        if codec[0] > 4 or (codec[1] in DELTA_CODES) != (codec[0] == TASK_CODECS["delta"]) \
                or (codec[0] != TASK_CODECS["delta"] and codec[1] != NONE):
            raise bad(f"task {t}: codec {codec[0]} with delta dtype code {codec[1]} is not one of the version 2 codecs")
        raw_tasks.append(names[off:off + ln])
        codecs.append(codec)
    entries, raw_names = [], []
    for i in range(n):
        kind, code, task, param, off, nbytes, numel, frac, ndim, noff, nlen, *dims, rounding = \
            ENTRY.unpack_from(data, table_off + ENTRY.size * i)
        if kind > (3 if version == 1 else 9) or code not in CODE_DTYPE or ndim > MAX_DIMS:
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
        if (task != NONE and task >= n_tasks) or (kind in PER_TASK) != (task != NONE):
            raise bad(f"{where}: task index {task} invalid for its kind")
        if not (0 <= frac <= 30):
            raise bad(f"{where}: fraction bits {frac} out of range")
        rounding = rounding if version == 2 else 0  # v1 readers never looked at these bytes
        if rounding not in (0, *ROUNDINGS.values()) or (rounding and kind != 0):
            raise bad(f"{where}: rounding code {rounding} (a base entry may round to F16 or BF16, nothing else)")
        entries.append(Entry(kind, code, task, param, off, nbytes, numel, frac, tuple(dims[:ndim]),
                             raw_names[-1].decode("utf-8", "surrogateescape"), rounding))  # distinct bytes, distinct names
    _check_links(entries, raw_names, bad)
    _check_unique(entries, raw_names, raw_tasks, bad)
    if version == 2:
        _check_codecs(entries, codecs, data, bad)
    return Image(version, [t.decode("utf-8", "surrogateescape") for t in raw_tasks], codecs, entries, data)


U64_MAX = (1 << 64) - 1
ROUNDINGS = {"F16": CODES["F16"], "BF16": CODES["BF16"]}
CANONICAL_NAN = np.array(0x7FC00000, np.uint32).view(np.float32)
FLOAT_CODES = (CODES["F32"], CODES["F16"], CODES["Q16"])
LINK_DTYPE = {KINDS["scale"]: CODES["F32"], KINDS["fixpos"]: CODES["U64"], KINDS["fixval"]: CODES["F16"]}


def _check_links(entries: list[Entry], raw_names: list[bytes], bad) -> None:
    """Every linked entry points at a base of the same name; a vector (or elected vector) matches
    its base's element count and both are F32/F16/Q16; a mask or sign plane is U8 of
    ceil(numel / 8) bytes; scales are F32, fix positions U64, fix values F16."""
    for i, e in enumerate(entries):
        if e.kind not in LINKED:
            continue
        where = f"entry {i} ({raw_names[i].decode('utf-8', 'replace')!r})"
        if e.param >= len(entries) or entries[e.param].kind != 0:
            raise bad(f"{where}: param index {e.param} does not point at a base entry")
        b = entries[e.param]
        if raw_names[i] != raw_names[e.param]:
            raise bad(f"{where}: name differs from its base's")
        if e.kind in (1, 4) and (e.numel != b.numel or e.dtype not in FLOAT_CODES or b.dtype not in FLOAT_CODES):
            raise bad(f"{where}: vector does not match its base (same element count, F32/F16/Q16 both)")
        if e.kind in (2, 5) and (e.dtype != CODES["U8"] or e.nbytes != (b.numel + 7) // 8):
            raise bad(f"{where}: mask has {e.nbytes} bytes of code {e.dtype}; {b.numel} elements need {(b.numel + 7) // 8} U8")
        if e.kind in LINK_DTYPE and e.dtype != LINK_DTYPE[e.kind]:
            raise bad(f"{where}: a scale is F32, a fix position U64, a fix value F16 (dtype code {e.dtype})")


def _check_codecs(entries: list[Entry], codecs: list[tuple[int, int]], data: bytes, bad) -> None:
    """Version 2: a merged param (a base that any entry links to) is F32/F16/Q16, and for every
    task it has exactly the entries that task's codec takes (docs/format.md); fix positions are
    strictly increasing and inside the param."""
    have: dict[int, dict[tuple[int, int], Entry]] = {}
    for e in entries:
        if e.kind in LINKED:
            have.setdefault(e.param, {})[(e.kind, e.task)] = e
    for i, links in sorted(have.items()):
        b = entries[i]
        where = f"entry {i} ({b.name!r})"
        if b.dtype not in FLOAT_CODES:
            raise bad(f"{where}: a merged param must be F32/F16/Q16, not dtype code {b.dtype}")
        kinds: dict[int, set[int]] = {}  # task (NONE: the shared vectors) -> the kinds it has for this param
        for k, task in links:
            kinds.setdefault(task, set()).add(k)
        shared = kinds.get(NONE, set())
        for t, (codec, dcode) in enumerate(codecs):
            got = kinds.get(t, set())
            need, may = _codec_kinds(codec, dcode)
            if not need <= got | shared or not got <= need | may or (codec in (0, 1) and 1 not in shared) \
                    or (codec == 4 and 4 not in shared):
                raise bad(f"{where}: task {t} (codec {codec}) needs entry kinds {sorted(need)} and may have {sorted(may)}; "
                          f"it has {sorted(got | shared)}")
            if 6 in got:
                want = quant_rows(b.shape) if codec == TASK_CODECS["delta"] else 1
                if links[(6, t)].numel != want:
                    raise bad(f"{where}: task {t} has {links[(6, t)].numel} scales, its codec takes {want}")
            if 7 in got:
                d = links[(7, t)]
                want = (CODES["U8"], (b.numel + 1) // 2) if dcode == I4 else (dcode, b.numel)
                if (d.dtype, d.numel) != want:
                    raise bad(f"{where}: task {t}'s delta is dtype {d.dtype} × {d.numel}; its codec takes {want[0]} × {want[1]}")
            if (8 in got) != (9 in got) or (8 in got and links[(8, t)].numel != links[(9, t)].numel):
                raise bad(f"{where}: task {t}'s fix positions and fix values differ in count")
            if 8 in got:
                pos = np.frombuffer(data, "<u8", links[(8, t)].numel, links[(8, t)].offset)
                if pos.size and (pos[-1] >= b.numel or (pos.size > 1 and not (pos[1:] > pos[:-1]).all())):
                    raise bad(f"{where}: task {t}'s fix positions are not strictly increasing below {b.numel}")


def _codec_kinds(codec: int, dcode: int) -> tuple[set[int], set[int]]:
    """(entry kinds the codec needs for a (param, task), kinds it may have besides)."""
    fix = {8, 9}
    if codec == 0:
        return set(), {2} | fix
    if codec == 1:
        return {6}, {2} | fix
    if codec in (2, 4):
        return ({2, 5, 6} if codec == 2 else {2, 6}), fix
    return ({7, 6} if dcode in (CODES["I8"], I4) else {7}), fix


def _check_unique(entries: list[Entry], raw_names: list[bytes], raw_tasks: list[bytes], bad) -> None:
    """Non-empty sections never overlap; task names, base names, a param's vector (or elected
    vector) and a (param, task)'s entry of each kind are each unique."""
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.nbytes)
    if any(s1 < e0 for (_s0, e0), (s1, _e1) in zip(spans, spans[1:])):
        raise bad("sections overlap")
    bases = [raw_names[i] for i, e in enumerate(entries) if e.kind == 0]
    if len(set(bases)) != len(bases):
        raise bad("two base entries share a name")
    links = [(e.kind, e.param, e.task) for e in entries if e.kind in LINKED]
    if len(set(links)) != len(links):
        raise bad("a param has two entries of one kind (two vectors, or two masks for one task)")
    if len(set(raw_tasks)) != len(raw_tasks):
        raise bad("two tasks share a name")


def _values(e: Entry, data: bytes) -> np.ndarray:
    raw = np.frombuffer(data, dtype=CODE_DTYPE[e.dtype], count=e.numel, offset=e.offset)
    if e.dtype == CODES["Q16"]:
        return dequant(raw, e.frac_bits)
    return raw.astype(np.float32) if e.dtype in (0, 1, CODES["BF16"]) else raw


def rebuild(path: str, task: str) -> dict[str, np.ndarray]:
    """θ_t of every merged param (float32, flat), by the image's rule for the task's codec -- the
    reference for the C applier. Every operation is one float32 operation, as in C."""
    im = read_image(path)
    if task not in im.tasks:
        raise ConfigError(unknown_name("task", task, im.tasks))
    t = im.tasks.index(task)
    codec, dcode = im.codecs[t]
    links: dict[int, dict[int, Entry]] = {}
    for e in im.entries:
        if e.kind in LINKED and e.task in (NONE, t):
            links.setdefault(e.param, {})[e.kind] = e
    out = {}
    for i, e in enumerate(im.entries):
        got = links.get(i, {})
        if e.kind != 0 or not got or (im.version == 1 and 1 not in got):  # v1: a base without a vector is carried
            continue
        base = _values(e, im.data)
        val = lambda kind: _values(got[kind], im.data)  # noqa: E731
        bits = lambda kind: np.ones(e.numel, bool) if kind not in got else np.unpackbits(  # noqa: E731
            np.frombuffer(im.data, np.uint8, got[kind].nbytes, got[kind].offset), count=e.numel).view(bool)
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf in a hand-made image is NaN, as in C
            if codec == TASK_CODECS["tswitch"]:
                c = val(6)[0]
                res = np.where(bits(2), base + np.where(bits(5), -c, c), base)
            elif codec == TASK_CODECS["delta"]:
                if dcode in (CODES["I8"], I4):
                    q = val(7) if dcode == CODES["I8"] else unpack_nibbles(val(7), e.numel)
                    cols = e.numel // quant_rows(e.shape) if e.numel else 1
                    d = q.astype(np.float32) * val(6)[np.arange(e.numel) // cols]
                else:
                    d = val(7)
                res = base + d
            else:  # tall, tall-scaled, emr: a select of θ0 + (s ·) the shared vector
                v = val(4 if codec == TASK_CODECS["emr"] else 1)
                res = np.where(bits(2), base + (v if codec == TASK_CODECS["tall"] else val(6)[0] * v), base)
            res = _round(res.astype(np.float32), e.round)
            if 8 in got:
                pos = val(8).astype(np.int64)
                res[pos] = _round(res[pos] + val(9).astype(np.float32), e.round)
        out[e.name] = res
    return out


def _round(x: np.ndarray, code: int) -> np.ndarray:
    """float32 values rounded to F16 / BF16 (nearest, ties to even; overflow to ±inf) and back,
    every NaN as the canonical quiet NaN; code 0: as they are."""
    if not code:
        return x
    y = x.astype(CODE_DTYPE[code]).astype(np.float32)
    y[np.isnan(y)] = CANONICAL_NAN
    return y

