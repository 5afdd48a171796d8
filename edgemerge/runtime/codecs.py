"""Per-task codecs (bundle format v2, docs/format.md §8): how one task's θ_t is rebuilt.

Each task names one codec; each codec has one rule, written here once as plain numpy
(``rebuild_reference``) and run by the fast kernels (``rebuild``), bit for bit:

- ``tall``: the v1 rule, a select of θ0 + τ_MTL by the task's mask (no mask: every bit set);
  with ``scale: "ls"`` the selected τ_MTL is scaled per tensor, ``m_i ? θ0[i] + f32(s·τ[i]) : θ0[i]``,
  s a float32 least-squares fit to θ_t (data-free).
- ``tswitch``: ``p_i ? θ0[i] + (s_i ? −c : c) : θ0[i]`` with a presence plane p, a sign plane s and
  one float32 scale c per tensor; no shared vector (T-Switch, Qi et al., CVPR 2025).
- ``delta``: ``θ0[i] + δ[i]`` with the task's own τ_t stored as F32/F16/BF16, or quantized per row
  (the first dim; 1-D and 0-d tensors: one row) to I8 / I4: ``δ[i] = f32(q[i]) × s[row(i)]``.
- ``emr``: EMR-Merging (Huang et al., NeurIPS 2024): the scaled select over the bundle's elected
  vector u (``elected/<param>``, shared by the emr tasks), the task's presence plane and its
  rescaler λ_t: ``m_i ? θ0[i] + f32(λ_t·u[i]) : θ0[i]``.

Any codec may add a sparse **correction**: after the rule, ``θ_t[i] = R(W(θ̂_t[i]) + v_j)`` at the
positions of a fix plane, v_j from an F16 list (the largest entries of θ_t − θ̂_t).

Bit planes live in one ``planes/<task>`` tensor per task, raw or as one xz stream (``lzma``, in
every Python; a plane of density p costs ≈ H(p) bits per parameter at rest, not 1). They are
decoded once per task, at its first use, into the packed full-length planes the kernels take, so a
switch costs the same whatever the storage encoding.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import FormatError, unknown_name
from .bits import BIT_ORDER, pack_bits, packed_nbytes, unpack_bits
from .dtypes import DTYPES, VECTOR_DTYPES
from .kernel import OP_Q8, OP_SCALED, OP_SIGN, _apply_c, _cmask, apply_mask, c_job, check_out, run_jobs, select_job, select_operands

CODECS = ("tall", "tswitch", "delta", "emr")
PRIVATE_DTYPES = ("F16", "BF16")  # what a task's float32 private tensors may be stored in (codec key ``private``)
PLANE_ENCODINGS = ("raw", "xz")
CODE_ENCODINGS = ("raw", "xz", "lowrank")  # a quantized delta's codes at rest (lowrank: I8 only)
LOWRANK_MAX_RANK = 1023  # r·128² < 2²⁴: every partial sum of a factor product is an exact float32 integer
TALL_SCALES = ("none", "ls")  # tall: no scale, or one least-squares scale per tensor
_KIND = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
if "BF16" in DTYPES:
    _KIND[DTYPES["BF16"]] = 2


def planes_name(task: str) -> str:
    return f"planes/{task}"


def scales_name(task: str) -> str:
    return f"scale/{task}"


def delta_name(task: str, param: str) -> str:
    return f"delta/{task}/{param}"


def dscale_name(task: str, param: str) -> str:
    return f"dscale/{task}/{param}"


def dscales_name(task: str) -> str:
    """Format v3: every merged param's quantization scales of ``task`` in one tensor."""
    return f"dscale/{task}"


QUANT_DTYPES = ("I8", "I4")  # delta quantized per row: signed 8-bit, or 4-bit two's complement nibbles


def quant_rows(shape: tuple[int, ...]) -> int:
    """Rows of a quantized delta: its first dim for 2-D and higher tensors, else one."""
    return shape[0] if len(shape) >= 2 else 1


_NIBBLES = np.array([[hi - 16 * (hi > 7), lo - 16 * (lo > 7)] for hi in range(16) for lo in range(16)], np.int8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """I4 storage -> int8: element 2j is the high nibble of byte j, 2j+1 the low one (two's complement)."""
    return _NIBBLES[np.asarray(packed, np.uint8)].reshape(-1)[:n]


def fix_name(task: str) -> str:
    return f"fix/{task}"


def dcodes_name(task: str) -> str:
    return f"dcodes/{task}"


def code_nbytes(dtype: str, n: int) -> int:
    """Bytes of one param's quantized δ codes: I8 one per element, I4 two per byte."""
    return n if dtype == "I8" else (n + 1) // 2


@dataclass(frozen=True)
class Codec:
    """A task's codec as the manifest names it (``tasks[i]["codec"]``)."""

    name: str = "tall"
    planes: str = "raw"             # tall / tswitch: "raw" or "xz"; tall + raw = v1 mask tensors
    dtype: str | None = None        # delta: F32 / F16 / BF16, or I8 / I4 (quantized per row)
    correction: int = 0             # entries of the sparse correction (0: none)
    scale: str = "none"             # tall: "none", or "ls" (a float32 scale per tensor in scale/<task>)
    codes: str = "raw"              # quantized delta: "raw" (a tensor per param), or one stream dcodes/<task>:
    #                                 "xz" (the codes compressed), "lowrank" (I8 codes rebuilt from int8 factors)
    private: str = "raw"            # any codec: "F16" / "BF16", the dtype ``private_keys`` are stored in ...
    private_keys: tuple[str, ...] = ()  # ... the task's float32 private tensors (heads, statistics), read as float32

    @property
    def plain_tall(self) -> bool:
        """The v1 rule exactly: a TALL mask over τ_MTL, no scale, no correction."""
        return self.name == "tall" and self.scale == "none" and not self.correction

    @property
    def has_scales(self) -> bool:
        """Stores one float32 scale per merged param (``scale/<task>``)."""
        return self.name in ("tswitch", "emr") or self.scale == "ls"

    @property
    def shared(self) -> bool:
        """Reads the shared vector τ_MTL."""
        return self.name == "tall"

    @property
    def qscale_rows(self) -> bool:
        """A quantized delta (codes + one float32 scale per row)."""
        return self.name == "delta" and self.dtype in QUANT_DTYPES

    def qscale_count(self, shape: tuple[int, ...]) -> int:
        """Scales a quantized delta holds for a param of ``shape`` in format v3's ``dscale/<task>``:
        one with lowrank codes (broadcast to every row), else one per row."""
        return 1 if self.codes == "lowrank" else quant_rows(shape)

    @property
    def uses_codes_tensor(self) -> bool:
        """A quantized delta whose codes are one stream ``dcodes/<task>`` (xz or lowrank)."""
        return self.qscale_rows and self.codes != "raw"

    @property
    def uses_planes_tensor(self) -> bool:
        return self.name in ("tswitch", "emr") or (self.name == "tall" and self.planes == "xz") or self.correction > 0

    def describe(self) -> str:
        """What ``inspect`` prints: the rule and how its data is stored, e.g. ``delta I4 (xz codes) + correction``."""
        text = self.name + (f" {self.dtype}" if self.name == "delta" else "") + (f" ({self.codes} codes)" if self.codes != "raw" else "")
        return (text + (" + scale" if self.scale != "none" else "") + (" + correction" if self.correction else "")
                + (f" + {self.private} private" if self.private_keys else ""))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.name != "delta":
            d["planes"] = self.planes
        if self.scale != "none":
            d["scale"] = self.scale
        if self.name == "delta":
            d["dtype"] = self.dtype
        if self.codes != "raw":
            d["codes"] = self.codes
        d["correction"] = self.correction
        if self.private_keys:
            d["private"] = {"dtype": self.private, "keys": list(self.private_keys)}
        return d

    @classmethod
    def parse(cls, where: str, raw: Any) -> "Codec":
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or raw.get("name") not in CODECS:
            got = raw.get("name") if isinstance(raw, dict) else raw
            raise FormatError(f"{where}: {unknown_name('codec', str(got), CODECS)}")
        c = cls(raw["name"], raw.get("planes", "raw"), raw.get("dtype"), raw.get("correction", 0), raw.get("scale", "none"),
                raw.get("codes", "raw"))
        if c.scale not in TALL_SCALES or (c.scale != "none" and c.name != "tall"):
            raise FormatError(f"{where}: codec scale {c.scale!r}: a tall codec takes one of {', '.join(TALL_SCALES)}, "
                              "other codecs none")
        if c.name != "delta" and c.planes not in PLANE_ENCODINGS:
            raise FormatError(f"{where}: plane encoding {c.planes!r} is not one of {', '.join(PLANE_ENCODINGS)}")
        if c.name == "delta" and c.dtype not in VECTOR_DTYPES + QUANT_DTYPES:
            raise FormatError(f"{where}: delta dtype {c.dtype!r} is not one of {', '.join(VECTOR_DTYPES + QUANT_DTYPES)}")
        if c.codes not in CODE_ENCODINGS or (c.codes != "raw" and not c.qscale_rows) or (c.codes == "lowrank" and c.dtype != "I8"):
            raise FormatError(f"{where}: codec codes {c.codes!r}: a quantized delta takes raw or xz (I8 / I4) or lowrank "
                              "(I8), other codecs raw")
        if type(c.correction) is not int or c.correction < 0:
            raise FormatError(f"{where}: codec 'correction' must be a non-negative integer")
        if "private" in raw:  # float32 private tensors stored in a half dtype
            pv = raw["private"]
            keys = pv.get("keys") if isinstance(pv, dict) else None
            if (not isinstance(pv, dict) or pv.get("dtype") not in PRIVATE_DTYPES or not isinstance(keys, list) or not keys
                    or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys)):
                raise FormatError(f"{where}: codec 'private' must be {{\"dtype\": {' or '.join(PRIVATE_DTYPES)}, "
                                  "\"keys\": [distinct private keys]}")
            c = replace(c, private=pv["dtype"], private_keys=tuple(keys))
        return c


@dataclass(frozen=True)
class Recipe:
    """What rebuilds one merged param of one task: flat arrays in the param's element order."""

    kind: str                                  # "tall" | "tswitch" | "delta"
    presence: np.ndarray | None = None         # packed plane (tall: None = every bit; tswitch)
    sign: np.ndarray | None = None             # tswitch: packed full-length sign plane
    scale: float = 0.0                         # tswitch: c; scaled tall: s (float32 values)
    scaled: bool = False                       # tall: τ_MTL times ``scale`` where the mask is set
    delta: np.ndarray | None = None            # delta: τ_t, or its int8 codes when quantized
    qscale: np.ndarray | None = None           # quantized delta: float32 scale per row
    qgrid: tuple[int, int, int] = (0, 0, 0)    # (a, b, axis): codes as [a, b], one scale per row (0) or column (1)
    packed4: bool = False                      # codes still in I4 storage (two per byte), decoded by the kernel
    fix_index: np.ndarray | None = None        # correction positions (int64, increasing)
    fix_value: np.ndarray | None = None        # correction values (float32)

    def transposed(self, shape: tuple[int, ...]) -> "Recipe":
        """The recipe of the same 2-D param stored transposed (bits, δ and positions permuted)."""
        rows, cols = shape
        n = rows * cols

        def plane(p):
            return None if p is None else pack_bits(unpack_bits(p, n).reshape(shape).T)

        delta = None if self.delta is None else np.ascontiguousarray(self.codes().reshape(shape).T).reshape(-1)
        grid = (cols, rows, 1 - self.qgrid[2]) if self.qscale is not None else self.qgrid
        idx, val = self.fix_index, self.fix_value
        if idx is not None:
            r, c = np.divmod(idx, cols)
            t = c * rows + r
            order = np.argsort(t, kind="stable")
            idx, val = t[order], val[order]
        return replace(self, presence=plane(self.presence), sign=plane(self.sign), delta=delta, fix_index=idx, fix_value=val,
                       qgrid=grid, packed4=False)

    def codes(self) -> np.ndarray:
        """δ as stored, with I4 codes unpacked to int8."""
        return unpack_nibbles(self.delta, self.qgrid[0] * self.qgrid[1]) if self.packed4 else self.delta

    def dequantized(self) -> np.ndarray:
        """δ in float32 (flat): τ_t as stored, or the quantized codes times their row's scale."""
        if self.qscale is None:
            return np.asarray(self.delta).reshape(-1).astype(np.float32, copy=False)
        a, b, axis = self.qgrid
        s = self.qscale[:, None] if axis == 0 else self.qscale[None, :]
        return (self.codes().reshape(a, b).astype(np.float32) * s).reshape(-1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.presence, self.sign, self.delta, self.qscale, self.fix_index, self.fix_value)
                   if a is not None)


# -- the rules ----------------------------------------------------------------------------------

def rebuild_reference(base: np.ndarray, vector: np.ndarray | None, r: Recipe) -> np.ndarray:
    """θ_t of one param by the rule, in plain numpy (the definition every kernel is tested against)."""
    n = base.size
    b32 = np.asarray(base).reshape(-1).astype(np.float32)
    if r.kind == "tall":
        mask = np.ones(n, bool) if r.presence is None else unpack_bits(r.presence, n)
        v32 = np.asarray(vector).reshape(-1).astype(np.float32)
        res = np.where(mask, b32 + (np.float32(r.scale) * v32 if r.scaled else v32), b32)
    elif r.kind == "tswitch":
        c = np.float32(r.scale)
        add = np.where(unpack_bits(r.sign, n), -c, c)
        res = np.where(unpack_bits(r.presence, n), b32 + add, b32)
    else:
        res = b32 + r.dequantized()
    out = res.astype(base.dtype)
    if r.fix_index is not None and r.fix_index.size:
        out[r.fix_index] = (out[r.fix_index].astype(np.float32) + r.fix_value).astype(base.dtype)
    return out.reshape(base.shape)


def _view(kind: int):
    """Flat float32 arrays as they are, half ones as their bits (the buffer protocol has no bfloat16)."""
    return (lambda a: a.reshape(-1)) if kind == 0 else (lambda a: a.reshape(-1).view(np.uint16))


def sign_job(base: np.ndarray, presence: np.ndarray, sign: np.ndarray, scale: float, out: np.ndarray) -> tuple | None:
    """The C job of the tswitch rule (planes and ``out`` checked), or None where numpy runs it."""
    n = base.size
    check_out(base, out)
    for what, plane in (("presence", presence), ("sign", sign)):
        if plane.dtype != np.uint8 or plane.size != packed_nbytes(n):
            raise FormatError(f"tswitch {what} plane has {plane.size} bytes, {n} elements need {packed_nbytes(n)}")
    kind = _KIND.get(base.dtype)
    if _cmask() is None or kind is None or not n:
        return None
    v = _view(kind)
    return c_job(OP_SIGN, v(np.ascontiguousarray(base)), presence, sign, v(out), scale=scale, bk=kind)


def apply_sign(base: np.ndarray, presence: np.ndarray, sign: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """The tswitch rule into ``out`` (θ0's shape and dtype): the C kernel where it is built and
    takes the dtype, else numpy in blocks."""
    job = sign_job(base, presence, sign, scale, out)
    if job is not None:
        run_jobs([job])
        return out
    b, o, n, c32 = np.ascontiguousarray(base).reshape(-1), out.reshape(-1), base.size, np.float32(scale)
    block = 1 << 20
    for s in range(0, n, block):
        e = min(n, s + block)
        p = np.unpackbits(presence[s // 8 : (e + 7) // 8], count=e - s, bitorder=BIT_ORDER).view(bool)
        sg = np.unpackbits(sign[s // 8 : (e + 7) // 8], count=e - s, bitorder=BIT_ORDER).view(bool)
        b32 = b[s:e].astype(np.float32, copy=False)
        np.copyto(o[s:e], np.where(p, b32 + np.where(sg, -c32, c32), b32), casting="unsafe")
    return out


def q8_job(base: np.ndarray, r: Recipe, out: np.ndarray) -> tuple | None:
    """The C job of a quantized delta (θ0 float32/float16/bfloat16), or None where numpy runs it."""
    check_out(base, out)
    kind = _KIND.get(base.dtype)
    if _cmask() is None or kind is None or not base.size:
        return None
    a, b, axis = r.qgrid
    v = _view(kind)
    q = np.ascontiguousarray(r.delta, np.uint8 if r.packed4 else np.int8)
    # threads may split inside a byte of I4 codes: they only read it
    return c_job(OP_Q8, v(np.ascontiguousarray(base)), q, np.ascontiguousarray(r.qscale, np.float32), v(out),
                 bk=kind, cols=b, axis=axis, nib=int(r.packed4))


def scaled_job(base: np.ndarray, vector: np.ndarray, packed: np.ndarray, scale: float, out: np.ndarray) -> tuple | None:
    """The C job of the scaled select (operands checked by ``select_operands``), or None where
    numpy runs it."""
    bk, vk = _KIND.get(base.dtype), _KIND.get(vector.dtype)
    if _cmask() is None or bk is None or vk is None or not base.size:
        return None
    return c_job(OP_SCALED, _view(bk)(np.ascontiguousarray(base)), _view(vk)(np.ascontiguousarray(vector)),
                 np.ascontiguousarray(packed), _view(bk)(out), scale=scale, bk=bk, vk=vk)


def rebuild_job(base: np.ndarray, vector: np.ndarray | None, r: Recipe, out: np.ndarray) -> tuple | None:
    """The C job that rebuilds one param by its recipe, correction included (operands checked),
    or None where ``rebuild`` runs numba or numpy."""
    if r.kind == "tall" and r.scaled:
        job = scaled_job(base, vector, select_operands(base, r.presence, out), r.scale, out)
    elif r.kind == "tall":
        job = select_job(base, vector, select_operands(base, r.presence, out), out)
    elif r.kind == "tswitch":
        job = sign_job(base, r.presence, r.sign, r.scale, out)
    elif r.qscale is not None:
        job = q8_job(base, r, out)
    else:
        delta = r.delta.reshape(base.shape)
        job = select_job(base, delta, select_operands(base, None, out), out)
    if job is None or r.fix_index is None or not r.fix_index.size:
        return job
    return c_job(*job[:5], *job[7:], fix=(r.fix_index, r.fix_value))  # the same job, with its correction


def rebuild(base: np.ndarray, vector: np.ndarray | None, r: Recipe, out: np.ndarray) -> np.ndarray:
    """θ_t of one param into ``out`` by the fastest kernel for its codec; bit-identical to
    ``rebuild_reference``."""
    job = rebuild_job(base, vector, r, out)
    if job is not None:
        run_jobs([job])
        return out
    if r.kind == "tall" and r.scaled:  # no C kernel for the pair: the rule itself
        np.copyto(out, rebuild_reference(base, vector, replace(r, fix_index=None)), casting="no")
    elif r.kind == "tall":
        apply_mask(base, vector, r.presence, out)
    elif r.kind == "tswitch":
        apply_sign(base, r.presence, r.sign, r.scale, out)
    elif r.qscale is not None:
        apply_mask(base, r.dequantized().reshape(base.shape), None, out)
    else:
        apply_mask(base, r.delta.reshape(base.shape), None, out)
    if r.fix_index is not None and r.fix_index.size:
        flat = out.reshape(-1)
        flat[r.fix_index] = (flat[r.fix_index].astype(np.float32) + r.fix_value).astype(out.dtype)
    return out


class SwitchPlan:
    """One task's rebuild of many params into fixed outputs, checked once: every param a C kernel
    takes runs in one C call (one per thread) over all their elements, so a switch pays no
    per-tensor overhead; the rest (no C build, dtypes only numpy takes) run through ``rebuild``.
    Holds its arrays while it lives. ``items``: (θ0, τ_MTL or None, recipe, out) per param."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray | None, Recipe, np.ndarray]]):
        jobs, self.rest = [], []
        for item in items:
            job = rebuild_job(*item)
            if job is None:
                self.rest.append(item)
            else:
                jobs.append(job)
        c = _cmask()
        self._plan = c.plan(jobs) if jobs else None
        self.size = c.plan_size(self._plan) if jobs else 0

    def run(self) -> None:
        if self._plan is not None:
            plan, c = self._plan, _cmask()
            _apply_c(lambda s, e: c.run_plan(plan, s, e), self.size)
        for item in self.rest:
            rebuild(*item)


# -- the planes tensor --------------------------------------------------------------------------

def planes_layout(codec: Codec, numels: list[int]) -> str:
    """What the planes tensor holds per merged param, in manifest order (docs/format.md §2.1)."""
    return " ".join(p for p, on in (("presence", codec.name in ("tswitch", "emr") or codec.name == "tall" and codec.planes == "xz"),
                                    ("signs", codec.name == "tswitch"), ("fix", codec.correction > 0)) if on)


def decode_planes(where: str, codec: Codec, blob: np.ndarray, numels: list[int]) -> list[dict[str, np.ndarray]]:
    """Inverse of ``encode_planes``: per param, packed full-length planes ``presence``, ``sign``
    (0 where absent) and the fix positions ``fix`` (int64). Every length is checked."""
    raw = memoryview(np.ascontiguousarray(blob).reshape(-1).view(np.uint8))
    if codec.planes == "xz":  # presence + signs + fix at most
        raw = memoryview(_unxz(where, blob, sum(3 * packed_nbytes(n) for n in numels)))
    layout = planes_layout(codec, numels).split()
    pos, out = 0, []

    def take(nbits: int, what: str) -> np.ndarray:
        nonlocal pos
        k = packed_nbytes(nbits)
        if pos + k > len(raw):
            raise FormatError(f"{where}: the planes end early ({what} of param {len(out)} needs {k} bytes at {pos}, "
                              f"{len(raw)} in all)")
        chunk = np.frombuffer(raw[pos : pos + k], dtype=np.uint8)
        if nbits % 8 and chunk[-1] & ((1 << (8 - nbits % 8)) - 1):
            raise FormatError(f"{where}: {what} of param {len(out)} has padding bits set")
        pos += k
        return chunk

    for n in numels:
        d: dict[str, np.ndarray] = {}
        if "presence" in layout:
            d["presence"] = take(n, "presence").copy()
        if "signs" in layout:
            present = np.flatnonzero(unpack_bits(d["presence"], n))
            full = np.zeros(n, bool)
            full[present] = unpack_bits(take(present.size, "signs"), present.size)
            d["sign"] = pack_bits(full)
        if "fix" in layout:
            d["fix"] = np.flatnonzero(unpack_bits(take(n, "fix"), n)).astype(np.int64)
        out.append(d)
    if pos != len(raw):
        raise FormatError(f"{where}: {len(raw) - pos} bytes after the last plane")
    return out


def lowrank_codes(shift: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The lowrank rule: I8 codes ``q = clip((A·B + h) >> e, −127, 127)`` of an [m, n] param from
    int8 factors A [m, r] and B [r, n] and a shift e per row, h = 2^e >> 1 (round half up). The
    product runs as float32 BLAS yet is exact: every partial sum is an integer below r·128² < 2²⁴."""
    d = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.int32)
    e = shift.astype(np.int32)[:, None]
    return np.clip((d + ((1 << e) >> 1)) >> e, -127, 127).astype(np.int8)


def decode_lowrank(where: str, blob: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """``codes: lowrank``: one xz stream of a record per merged param, in manifest order, its rows
    m = the first dim (1-D and 0-d: one row) and n = numel / m: a kind byte, then kind 0: the m·n
    I8 codes; kind 1: rank r (uint32 LE), then, when r > 0, e (m uint8, each ≤ 24), A (m·r int8,
    row-major) and B (r·n int8, row-major), the codes being ``lowrank_codes(e, A, B)`` (r = 0: all
    0). A kind-1 record is never larger than kind 0 would be: r·(m+n) + m + 4 ≤ m·n, r ≤ 1023."""
    grids = [(quant_rows(s), int(np.prod(s, dtype=np.int64)) // quant_rows(s) if quant_rows(s) else 0) for s in shapes]
    raw = memoryview(_unxz(where, blob, sum(1 + m * n for m, n in grids)))
    out, pos = [], 0

    def take(k: int, i: int) -> memoryview:
        nonlocal pos
        if pos + k > len(raw):
            raise FormatError(f"{where}: the lowrank codes end inside the record of param {i}")
        pos += k
        return raw[pos - k : pos]

    for i, (m, n) in enumerate(grids):
        kind = take(1, i)[0]
        if kind == 0:
            out.append(np.frombuffer(take(m * n, i), np.int8))
            continue
        if kind != 1:
            raise FormatError(f"{where}: param {i} has lowrank record kind {kind}; kinds are 0 (codes) and 1 (factors)")
        r = int.from_bytes(take(4, i), "little")
        if r > LOWRANK_MAX_RANK or r * (m + n) + m + 4 > m * n:
            raise FormatError(f"{where}: param {i} ([{m}, {n}]) has rank {r}: more than {LOWRANK_MAX_RANK}, or larger than its "
                              "codes; the file is damaged")
        if r == 0:
            out.append(np.zeros(m * n, np.int8))
            continue
        e = np.frombuffer(take(m, i), np.uint8)
        if int(e.max()) > 24:
            raise FormatError(f"{where}: param {i} has a row shift above 24; the file is damaged")
        a = np.frombuffer(take(m * r, i), np.int8).reshape(m, r)
        b = np.frombuffer(take(r * n, i), np.int8).reshape(r, n)
        out.append(lowrank_codes(e, a, b).reshape(-1))
    if pos != len(raw):
        raise FormatError(f"{where}: the lowrank codes have {len(raw) - pos} bytes after the last param's record")
    return out


def _unxz(where: str, blob: np.ndarray, bound: int) -> bytes:
    """One xz stream, decoded to at most ``bound`` bytes (no bomb inflates past it)."""
    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 28)
        raw = d.decompress(memoryview(np.ascontiguousarray(blob).reshape(-1).view(np.uint8)), max_length=bound + 1)
        ok = d.eof and not d.unused_data and len(raw) <= bound
    except lzma.LZMAError as exc:
        raise FormatError(f"{where}: the xz stream does not decode ({exc})") from None
    if not ok:
        raise FormatError(f"{where}: the xz stream is truncated, has trailing bytes or inflates past its planes or codes")
    return raw


def decode_codes(where: str, codec: Codec, blob: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """``dcodes/<task>`` -> per merged param (``shapes``, manifest order) its codes as the raw
    tensor would hold them (I8: int8 per element; I4: uint8, two per byte, an odd count's last low
    nibble 0). Every length is checked."""
    if codec.codes == "lowrank":
        return decode_lowrank(where, blob, shapes)
    dtype, numels = codec.dtype, [int(np.prod(s, dtype=np.int64)) for s in shapes]
    sizes = [code_nbytes(dtype, n) for n in numels]
    raw = _unxz(where, blob, sum(sizes))
    if len(raw) != sum(sizes):
        raise FormatError(f"{where}: the codes hold {len(raw)} bytes, the merged params need {sum(sizes)}")
    out, pos = [], 0
    for n, k in zip(numels, sizes):
        chunk = np.frombuffer(raw, np.int8 if dtype == "I8" else np.uint8, count=k, offset=pos)
        if dtype == "I4" and n % 2 and chunk[-1] & 15:
            raise FormatError(f"{where}: the codes of param {len(out)} have padding bits set")
        out.append(chunk)
        pos += k
    return out
