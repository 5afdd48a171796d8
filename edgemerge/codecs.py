"""Re-encode a bundle's tasks with per-task codecs (format v2; rules in edgemerge/runtime/codecs.py).

>>> spec = parse_codec("tswitch:density=0.1,planes=xz,correction=0.001")   # doctest: +SKIP
>>> encode_bundle("tasks.safetensors", {"a": "a.safetensors"}, {"a": spec}, "v2.safetensors")  # doctest: +SKIP

A codec spec is ``name[:key=value,...]``:

| codec | keys | what a task stores |
|---|---|---|
| ``tall`` | ``planes=raw|xz`` | its TALL mask over the shared τ_MTL (xz: compressed at rest) |
| ``tswitch`` | ``density`` (0-1, share of positive and of negative τ_t entries kept; 0.1), ``planes=xz|raw`` | presence + sign bits and one scale per tensor, no shared vector |
| ``delta`` | ``dtype=F16|BF16|F32|I8|I4``; I8 / I4 also ``qmax`` (largest code, 127 / 7), ``fit=mse|absmax|step`` (``step``: the step as a multiple of the tensor's RMS of τ_t, 0.5), ``codes=raw|xz``; I8 also ``codes=lowrank`` with ``bits`` (bits per merged param the task stores, 1) and ``step`` (its small params' step, 0.5) | τ_t itself (I8 / I4: quantized per row, one float32 scale each; xz: the codes compressed at rest; lowrank: the codes rebuilt from int8 factors of a truncated SVD of each matrix, the ranks allotted across the task's tensors to the budget) |

any codec takes ``repair=norm``: its norm layers' weights and biases stored as re-fit on
calibration inputs so that each layer's output statistics are θ_t's (``edgemerge.repair``; needs
``encode_bundle(repair=...)``, a model and inputs, so the Python API only; a delta stores the re-fit
values in its own codes, tall / tswitch / emr as correction entries: F16 values at the positions the
re-fit moves); and any codec takes ``correction`` (share of the merged parameters, 0-1): the largest entries of
θ_t − θ̂_t stored as a fix plane + F16 values.
"""

from __future__ import annotations

import json
import lzma
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from . import __version__
from .checkpoints import Checkpoint, file_sha256, open_checkpoint
from .errors import CheckpointError, ConfigError, FormatError, finite_score
from .inspect import PER_TASK
from .io import write_safetensors
from .runtime.bundle import (
    MANIFEST_KEY, Bundle, base_name, elected_name, mask_name, open_bundle, private_name, vector_name,
)
from .runtime.codecs import (
    CODE_ENCODINGS, CODECS, LOWRANK_MAX_RANK, PLANE_ENCODINGS, PRIVATE_DTYPES, QUANT_DTYPES, TALL_SCALES, Codec, Recipe, dcodes_name,
    decode_codes, decode_planes, delta_name, dscales_name, fix_name, lowrank_codes, planes_name,
    quant_rows, rebuild, scales_name,
)
from .runtime.bits import pack_bits, unpack_bits
from .runtime.dtypes import DTYPES, VECTOR_DTYPES

KEYS = {"tall": {"planes", "scale", "correction", "private", "repair"}, "tswitch": {"density", "planes", "correction", "private", "repair"},
        "emr": {"planes", "correction", "private", "repair"}, "delta": {"dtype", "correction", "qmax", "fit", "step", "codes", "bits", "private", "repair"}}
QMAX = {"I8": 127, "I4": 7}          # the largest code each quantized dtype holds
FITS = ("mse", "absmax", "step")     # a quantized row's scale: least squared error over clip levels, max|τ| / qmax,
#                                      or one step for the whole tensor (step × its RMS of τ; for codes=xz)
REPAIRS = ("none", "norm")            # "norm": the norm layers' affine params re-fit (edgemerge.repair)
REPAIR_STEP = 0.5                    # a re-fit param's step (fit=step, lowrank's small params) at most this × its RMS of τ
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)  # fit=mse tries s = max|τ_r| · f / qmax


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its encoder settings (what ``--codec`` parses)."""

    name: str = "tall"
    density: float = 0.1        # tswitch
    planes: str = "xz"          # tall / tswitch
    dtype: str = "F16"          # delta
    correction: float = 0.0     # share of merged parameters
    scale: str = "none"         # tall: "ls", a least-squares scale per tensor
    qmax: int = 0               # quantized delta: largest code (0: the dtype's, QMAX)
    fit: str = "mse"            # quantized delta: how each row's scale is chosen (FITS)
    codes: str = "raw"          # quantized delta: codes at rest, raw, xz or lowrank (I8)
    step: float = 0.5           # quantized delta, fit=step (and codes=lowrank's small params): the step as a multiple of the tensor's RMS of τ
    bits: float = 1.0           # codes=lowrank: the task's budget, bits per merged param (factors, shifts, scales)
    private: str = "raw"        # any codec: the task's float32 private tensors (heads, statistics) as they are, or in F16 / BF16
    repair: str = "none"        # "norm": the norm layers' affine params re-fit on calibration inputs (encode_bundle's repair=)

    def label(self) -> str:
        parts = {"tall": [f"planes={self.planes}"], "tswitch": [f"density={self.density:g}", f"planes={self.planes}"],
                 "delta": [f"dtype={self.dtype}"], "emr": [f"planes={self.planes}"]}[self.name]
        if self.qmax:
            parts.append(f"qmax={self.qmax}")
        if self.fit != "mse" and self.dtype in QUANT_DTYPES and self.name == "delta":
            parts.append(f"fit={self.fit}")
            if self.fit == "step":
                parts.append(f"step={self.step:g}")
        if self.codes != "raw":
            parts.append(f"codes={self.codes}")
        if self.codes == "lowrank":
            parts.append(f"bits={self.bits:g}")
            if self.step != CodecSpec.step:
                parts.append(f"step={self.step:g}")
        if self.scale != "none":
            parts.append(f"scale={self.scale}")
        if self.correction:
            parts.append(f"correction={self.correction:g}")
        if self.private != "raw":
            parts.append(f"private={self.private}")
        if self.repair != "none":
            parts.append(f"repair={self.repair}")
        return f"{self.name}:{','.join(parts)}"


def parse_codec(text: str) -> CodecSpec:
    """``name[:key=value,...]`` -> CodecSpec; ConfigError naming the valid codecs and keys."""
    name, _, rest = text.partition(":")
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r} in {text!r}; valid: {', '.join(CODECS)}")
    kw: dict[str, Any] = {"planes": "raw" if name == "tall" else "xz"}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in KEYS[name]:
            raise ConfigError(f"codec {name!r} has no parameter {key!r} (in {text!r}); valid: {', '.join(sorted(KEYS[name]))}")
        kw[key] = value
    try:
        spec = CodecSpec(name, float(kw.get("density", 0.1)), kw["planes"], kw.get("dtype", "F16"),
                         float(kw.get("correction", 0.0)), kw.get("scale", "none"), int(kw.get("qmax", 0)),
                         kw.get("fit", "mse"), kw.get("codes", "raw"), float(kw.get("step", 0.5)), float(kw.get("bits", 1.0)),
                         kw.get("private", "raw"), kw.get("repair", "none"))
    except ValueError:
        raise ConfigError(f"codec {text!r}: density, correction, step and bits are numbers, qmax an integer") from None
    if not 0 < spec.density <= 1:
        raise ConfigError(f"codec {text!r}: density must be in (0, 1]")
    if not 0 <= spec.correction < 1:
        raise ConfigError(f"codec {text!r}: correction must be in [0, 1)")
    if spec.planes not in PLANE_ENCODINGS:
        raise ConfigError(f"codec {text!r}: planes must be one of {', '.join(PLANE_ENCODINGS)}")
    if spec.dtype not in VECTOR_DTYPES + QUANT_DTYPES:
        raise ConfigError(f"codec {text!r}: dtype must be one of {', '.join(VECTOR_DTYPES + QUANT_DTYPES)}")
    if spec.private not in ("raw", *PRIVATE_DTYPES):
        raise ConfigError(f"codec {text!r}: private must be one of raw, {', '.join(PRIVATE_DTYPES)} (the dtype the task's "
                          "float32 private tensors, its head and statistics, are stored in)")
    if spec.repair not in REPAIRS:
        raise ConfigError(f"codec {text!r}: repair must be one of {', '.join(REPAIRS)}")
    if spec.repair != "none" and spec.correction:
        raise ConfigError(f"codec {text!r}: repair and correction do not combine (a correction moves the re-fit params back "
                          "towards θ_t): drop one")
    if spec.scale not in TALL_SCALES:
        raise ConfigError(f"codec {text!r}: scale must be one of {', '.join(TALL_SCALES)}")
    quant = spec.dtype in QUANT_DTYPES
    if {"qmax", "fit", "step", "codes"} & set(kw) and not quant:
        raise ConfigError(f"codec {text!r}: qmax, fit, step and codes apply to a quantized delta (dtype={' or '.join(QUANT_DTYPES)})")
    if quant and not 1 <= (spec.qmax or QMAX[spec.dtype]) <= QMAX[spec.dtype]:
        raise ConfigError(f"codec {text!r}: qmax must be in [1, {QMAX[spec.dtype]}] for dtype {spec.dtype}")
    if spec.fit not in FITS:
        raise ConfigError(f"codec {text!r}: fit must be one of {', '.join(FITS)}")
    if "fit" in kw and spec.codes == "lowrank":
        raise ConfigError(f"codec {text!r}: codes=lowrank quantizes its small params with one step (step=MULTIPLE of the "
                          "tensor's RMS of τ, 0.5): drop fit")
    if "step" in kw and spec.fit != "step" and spec.codes != "lowrank":
        raise ConfigError(f"codec {text!r}: step applies to fit=step or codes=lowrank (add fit=step, or drop step)")
    if not (math.isfinite(spec.step) and spec.step > 0):
        raise ConfigError(f"codec {text!r}: step must be a number > 0 (a multiple of the tensor's RMS of τ; 0.5 is the default)")
    if spec.codes not in CODE_ENCODINGS:
        raise ConfigError(f"codec {text!r}: codes must be one of {', '.join(CODE_ENCODINGS)}")
    if spec.codes == "lowrank" and spec.dtype != "I8":
        raise ConfigError(f"codec {text!r}: codes=lowrank rebuilds I8 codes: use dtype=I8")
    if "bits" in kw and spec.codes != "lowrank":
        raise ConfigError(f"codec {text!r}: bits applies to codes=lowrank (add codes=lowrank, or drop bits)")
    if not (math.isfinite(spec.bits) and spec.bits > 0):
        raise ConfigError(f"codec {text!r}: bits must be a number > 0 (bits per merged parameter; 1 is the default)")
    return spec


def xz_stream(raw: bytes) -> bytes:
    """The one xz form every stream of the file uses (docs/format.md §8: lzma, CRC32 check)."""
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=6)


def encode_planes(codec: Codec, per_param: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The planes tensor's bytes: for each param, its presence plane, the signs of its present
    elements, its fix plane (each packed, big bit order; which ones: ``planes_layout``)."""
    parts = []
    for d in per_param:
        for key in ("presence", "signs", "fix"):
            if key in d:
                parts.append(pack_bits(d[key]).tobytes())
    raw = b"".join(parts)
    if codec.planes == "xz":
        raw = xz_stream(raw)
    return np.frombuffer(raw, dtype=np.uint8)


def encode_codes(dtype: str, codes: list[np.ndarray]) -> np.ndarray:
    """``dcodes/<task>``: every merged param's quantized δ codes as stored raw (I8 bytes, I4
    nibbles), concatenated in manifest order, as one xz stream (``decode_codes`` reads it)."""
    raw = b"".join(np.ascontiguousarray(c).reshape(-1).view(np.uint8).tobytes() for c in codes)
    return np.frombuffer(xz_stream(raw), dtype=np.uint8)


def plane_entropy_bits(p: float) -> float:
    """H(p): the bits per element a plane of density p needs at best."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# -- per-tensor encoders --------------------------------------------------------------------------

def tswitch_planes(tau: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """T-Switch for one tensor: keep the largest ``density`` share of the positive entries and of
    the negative ones (by magnitude; ties at the threshold kept), their signs, and the scale
    c = ‖kept‖₂ / √count that keeps the kept part's norm (the reference's binarize step)."""
    t = tau.reshape(-1).astype(np.float32, copy=False)
    keep = np.zeros(t.size, bool)
    for part in (t > 0, t < 0):
        mags = np.abs(t[part])
        k = int(mags.size * density)
        if k == 0 and mags.size:
            k = 1  # a tensor with few changed entries still keeps its largest one
        if k:
            thr = np.partition(mags, mags.size - k)[mags.size - k]
            keep |= part & (np.abs(t) >= thr)
    count = int(keep.sum())
    scale = np.float32(np.sqrt(np.sum(np.square(t[keep], dtype=np.float64)) / count)) if count else np.float32(0)
    return keep, t < 0, scale


def quantize_rows(tau: np.ndarray, shape: tuple[int, ...], qmax: int, fit: str = "absmax",
                  step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization, q = clip(round-half-even(τ / s_r), ±qmax), one float32 s_r
    per row: ``absmax`` s_r = max|τ_r| / qmax; ``mse`` the s_r = max|τ_r| · f / qmax (f in
    ``CLIPS``) whose rebuilt row q·s_r is nearest τ_r in squared error (clipping a long tail's
    few largest entries buys a finer step for the rest; the first f wins a tie); ``step`` one
    s = step · RMS(τ) for every row of the tensor (computed in float64, stored float32). One
    step everywhere is what an entropy coder wants: most codes are 0 or ±1, and the squared error
    for the bits spent is near the best a scalar quantizer gets (at equal rate the per-row fits
    spend the same relative error on rows that matter less)."""
    rows = quant_rows(shape)
    t = tau.reshape(rows, -1) if rows else tau.reshape(0, 0)
    if not t.size:
        return np.zeros(0, np.int8), np.zeros(rows, np.float32)
    if fit == "step":
        s = np.float32(step * math.sqrt(float(np.mean(np.square(t, dtype=np.float64)))))
        if not s > 0:
            return np.zeros(t.size, np.int8), np.zeros(rows, np.float32)
        q = np.clip(np.rint(t / s), -qmax, qmax).astype(np.int8)
        return q.reshape(-1), np.full(rows, s, np.float32)
    amax = np.abs(t).max(axis=1)
    clips = CLIPS if fit == "mse" else (1.0,)
    best: list[np.ndarray] = []
    for f in clips:
        scale = (amax * np.float32(f) / np.float32(qmax)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.clip(np.rint(t / safe[:, None]), -qmax, qmax).astype(np.int8)
        q[scale == 0] = 0
        err = np.square(q * scale[:, None] - t, dtype=np.float64).sum(axis=1) if len(clips) > 1 else amax
        if not best:
            best = [q, scale, err]
            continue
        better = err < best[2]
        for kept, new in zip(best, (q, scale, err)):
            kept[better] = new[better]
    q, scale, _ = best
    return q.reshape(-1), scale


LOWRANK_MIN_DIM = 16  # a param with fewer rows or columns keeps plain I8 codes (kind 0)
LOWRANK_SEARCH = 10   # bisection steps on the factors' share of the budget (the stored bytes found within ~0.1%)


def lowrank_small(tau: np.ndarray, shape: tuple[int, ...], step: float) -> tuple[np.ndarray, np.ndarray]:
    """A small param's I8 codes under ``codes: lowrank`` (kind 0): one step for the tensor,
    ``step`` × its RMS of τ, and its one stored scale ([1])."""
    q, scale = quantize_rows(tau, shape, QMAX["I8"], "step", step)
    return q, scale[:1] if scale.size else np.zeros(1, np.float32)


def lowrank_task(taus: list[tuple[np.ndarray, tuple[int, ...]]], spec: CodecSpec) -> list[tuple[np.ndarray, np.ndarray, bytes]]:
    """``codes: lowrank`` for one task, to the budget ``spec.bits``: per merged param (τ flat, shape)
    its I8 codes, stored scale ([1], one for every row) and record (docs/format.md §8). The budget
    is what the task stores: its records' xz stream plus one float32 scale per param, at most
    ``bits`` × the merged params. Each [m, n] matrix (rows: the first dim) with m, n ≥ 16 gets a
    truncated SVD; the components of all of them compete for the factors' share by σ² per bit, so
    the ranks go where they remove the most squared error, which is what weight fidelity measures.
    That share is found by bisection on the bytes the whole stream takes once compressed (how well
    factor bytes compress depends on the task). Smaller params (biases, norms, a depthwise conv's
    [C, 9]) keep plain I8 codes with one step for the tensor (``quantize_rows`` with ``fit=step`` at
    ``spec.step`` × its RMS of τ_t): mostly 0 and ±1, they compress to far fewer bytes than per-row
    least-squares codes, and the budget they no longer take goes to the ranks (bench/frontier_bench.py,
    vision suite: 96.5% normalized at 0.60 bits/param/task, where the encoder before kept 92.5% at
    0.56). A budget below the fixed part (those codes, each factored param's shift bytes and
    scale) keeps every rank 0 and is exceeded. A kept factor pair is A = U√S and B = √S Vᵀ: B
    quantized per component to int8, its scales folded into A, then A quantized with one scale for
    the whole matrix, so every component's code product weighs the same and one float32 scale (the
    least-squares fit of the codes to τ) serves the param: per-row scales cost 32 bits a row, which
    on narrow matrices is most of a sub-bit budget. (Coarser factors, ±15 or ±31 at equal stored
    bytes, bought more rank and weight fidelity yet lost agreement on the vision suite in a one-off
    trial, not a repo script.) The codes are ``lowrank_codes`` of the factors with
    one shift e for every row (the least that brings |A·B| within 127). Holds every matrix's SVD at
    once (about twice τ_t) and the int8 factors of each rank the search tries; the codes and the
    scale are built for the ranks kept only."""
    total = sum(t.size for t, _ in taus)
    target = spec.bits * total
    grids = [(quant_rows(shape), t.size // quant_rows(shape) if quant_rows(shape) else 0) for t, shape in taus]
    svd: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    small: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    fixed = 0
    for i, ((t, shape), (m, n)) in enumerate(zip(taus, grids)):
        if min(m, n) >= LOWRANK_MIN_DIM:
            svd[i] = np.linalg.svd(t.reshape(m, n), full_matrices=False)
            fixed += 8 * (1 + 4 + m) + 32
        else:
            small[i] = lowrank_small(t, shape, spec.step)
            fixed += 8 * len(xz_stream(b"\x00" + small[i][0].tobytes())) + 32
    # every component by its σ² per bit; a param's components come in order of σ, so a rank is a prefix
    cands = [(float(sv) ** 2 / (8 * (grids[i][0] + grids[i][1])), i) for i, (_, S, _) in svd.items() for sv in S if sv > 0]
    cands.sort(key=lambda c: -c[0])

    def allot(budget: float) -> tuple[int, ...]:
        """The ranks the greedy keeps when the factors may take ``budget`` bits at 8 per element."""
        rank = dict.fromkeys(svd, 0)
        for _, i in cands:
            m, n = grids[i]
            cost = 8 * (m + n)
            if cost > budget or rank[i] >= LOWRANK_MAX_RANK or (rank[i] + 1) * (m + n) + m + 4 > m * n:
                continue
            rank[i] += 1
            budget -= cost
        return tuple(rank.get(i, 0) for i in range(len(taus)))

    factors: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}  # (param, rank) -> A, B, e: what the search tries

    def factor(i: int, r: int) -> tuple[np.ndarray, np.ndarray, int]:
        if (i, r) not in factors:
            U, S, Vt = svd[i]
            root = np.sqrt(S[:r])
            a, b = U[:, :r] * root, root[:, None] * Vt[:r]
            sb = np.abs(b).max(axis=1) / 127
            sb[sb == 0] = 1
            qb = np.rint(b / sb[:, None]).astype(np.int8)
            a = a * sb
            qa = np.clip(np.rint(a / (np.abs(a).max() / 127 or 1)), -127, 127).astype(np.int8)  # one scale for all of A
            d = float(np.abs(np.matmul(qa.astype(np.float32), qb.astype(np.float32))).max())
            e = 0
            while d > 127 * (1 << e):
                e += 1
            factors[i, r] = qa, qb, e
        return factors[i, r]

    def record(i: int, r: int) -> bytes:
        if i in small:
            return b"\x00" + small[i][0].tobytes()
        if r == 0:
            return b"\x01" + (0).to_bytes(4, "little")
        qa, qb, e = factor(i, r)
        return b"\x01" + r.to_bytes(4, "little") + bytes([e]) * grids[i][0] + qa.tobytes() + qb.tobytes()

    def stored(ranks: tuple[int, ...]) -> int:
        """The bits the task stores with these ranks: its records' xz stream and one scale per param."""
        return 8 * len(xz_stream(b"".join(record(i, r) for i, r in enumerate(ranks)))) + 32 * len(ranks)

    lo, hi = 0.0, 4.0 * max(target - fixed, 0.0)  # a factor element stores in ≥ 2 bits: hi never fits unless no rank is left to add
    best = allot(hi)
    if stored(best) > target:
        best = allot(lo)
        for _ in range(LOWRANK_SEARCH):
            if hi - lo <= 8 * (LOWRANK_MIN_DIM * 2):  # less than the cheapest component: nothing more to find
                break
            mid = (lo + hi) / 2
            ranks = allot(mid)
            if stored(ranks) <= target:
                lo, best = mid, ranks
            else:
                hi = mid
    out = []
    for i, r in enumerate(best):  # the codes and scale of the ranks kept, only
        t, (m, n) = taus[i][0], grids[i]
        if i in small:
            out.append((*small[i], record(i, r)))
            continue
        if r == 0:
            out.append((np.zeros(t.size, np.int8), np.zeros(1, np.float32), record(i, 0)))
            continue
        qa, qb, e = factor(i, r)
        q = lowrank_codes(np.full(m, e, np.uint8), qa, qb)
        qf, tf = q.astype(np.float64), t.reshape(m, n).astype(np.float64)
        den = float(np.einsum("ij,ij->", qf, qf))
        scale = np.full(1, float(np.einsum("ij,ij->", qf, tf)) / den if den > 0 else 0, np.float32)
        out.append((q.reshape(-1), scale, record(i, r)))
    return out


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7] -> I4 storage (element 2j in the high nibble of byte j)."""
    u = (q.astype(np.int16) & 15).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] << 4) | u[1::2]


@dataclass
class _TaskOut:
    codec: Codec
    planes: list[dict[str, np.ndarray]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    records: dict[str, bytes] = field(default_factory=dict)  # codes: lowrank, per param (decoded: deltas)
    dscales: dict[str, np.ndarray] = field(default_factory=dict)
    fixes: list[np.ndarray] = field(default_factory=list)
    sq_err: float = 0.0
    sq_ref: float = 0.0
    density: float | None = None    # share of params the codec changes (tswitch, delta)
    private: str = "raw"            # the dtype the task's float32 private tensors are stored in (raw: as they are)
    repaired: int = 0               # params the repair re-fit


def _read_task(ckpt: Checkpoint, key: str, bundle: Bundle, task: str, shape: tuple[int, ...]) -> np.ndarray:
    name = key if key in ckpt.keys() else next((a for a, c in bundle.aliases.items() if c == key and a in ckpt.keys()), None)
    if name is None:
        raise CheckpointError(f"{ckpt.path}: task {task!r} has no tensor {key!r}; encode with the checkpoints the bundle was merged from")
    arr = ckpt.read(name)
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{ckpt.path}: tensor {key!r} is {list(arr.shape)}, the bundle's θ0 is {list(shape)}")
    return arr


def _delta_codes(spec: CodecSpec, shape: tuple[int, ...], tau: np.ndarray,
                 lowrank: tuple[np.ndarray, np.ndarray, bytes] | None = None) -> tuple[np.ndarray, np.ndarray | None, Recipe]:
    """A delta codec's stored form of one param's τ (``lowrank``: what ``lowrank_task`` made of
    it): the δ or I8 / I4 codes (unpacked), the stored scales (None for a float δ), and the Recipe
    that rebuilds it."""
    if spec.dtype in QUANT_DTYPES:
        if lowrank is not None:
            q, scale = lowrank[0], lowrank[1]
        else:
            q, scale = quantize_rows(tau, shape, spec.qmax or QMAX[spec.dtype], spec.fit, spec.step)
        rows = quant_rows(shape)
        return q, scale, Recipe("delta", delta=q, qscale=np.ascontiguousarray(np.broadcast_to(scale, (rows,))),
                                qgrid=(rows, tau.size // rows if rows else 0, 0))
    with np.errstate(over="ignore"):  # an overflow is refused by the caller, naming the tensor
        delta = tau.astype(DTYPES[spec.dtype])
    return delta, None, Recipe("delta", delta=delta)


def _refit_spec(spec: CodecSpec) -> CodecSpec:
    """How a param the repair re-fit is stored: the task's codec with its step at most REPAIR_STEP.
    A re-fit moves every entry a little (a shift, a gain per channel); the coarse step=2 that serves
    plain τ well rounds most of it away (bench/frontier_bench.py's repair rows)."""
    return replace(spec, step=min(spec.step, REPAIR_STEP))


class Refit:
    """What a repair (``encode_bundle(repair=...)``) may change for one task and how the task's codec
    stores it: ``names``, the merged params it can store element by element (a lowrank-factored
    matrix cannot); ``refit(name, values)`` → the values as a device will rebuild them (the codec's
    rounding, bit for bit), recorded as the task's target for that param. A delta stores them in its
    own codes (``stored``); tall / tswitch / emr (``hats``: the codec's θ̂_t) keep the codec's rebuild
    and add correction entries at the positions the re-fit moves (``fixes``: F16 values, as a
    correction stores them)."""

    def __init__(self, bundle: Bundle, task: str, spec: CodecSpec, lowrank: dict[str, tuple[np.ndarray, np.ndarray, bytes]],
                 hats: dict[str, np.ndarray] | None = None):
        self.bundle, self.task, self.spec, self.lowrank, self.hats = bundle, task, _refit_spec(spec), lowrank, hats
        self.names = frozenset(p.name for p in bundle.merged if p.name not in lowrank or lowrank[p.name][2][:1] == b"\x00")
        self.targets: dict[str, np.ndarray] = {}  # param -> the rebuilt values, as refit returned them
        self.stored: dict[str, tuple[np.ndarray, np.ndarray | None, Recipe]] = {}  # delta: param -> what the file stores for them
        self.fixes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # hats: param -> correction positions and F16 values

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        key = self.bundle.resolve(name)
        if key not in self.names:
            why = "a lowrank-factored matrix" if key in self.lowrank else "not a merged param of the bundle"
            raise ConfigError(f"task {self.task!r}: the repair re-fits {name!r}, {why}; it may change only "
                              f"{', '.join(sorted(self.names)[:4])}, ... (params the codec stores element by element)")
        p = self.bundle.param(key)
        base = self.bundle.base(key)
        values = np.asarray(values)
        if values.shape != tuple(p.shape):
            raise ConfigError(f"task {self.task!r}: the repair gave {name!r} shape {list(values.shape)}, the param is {list(p.shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            if self.hats is not None:
                hat = self.hats[key].reshape(-1)
                v = (values.astype(np.float32).reshape(-1) - hat.astype(np.float32)).astype(np.float16)
                idx = np.flatnonzero(v)
                self.fixes[key] = (idx, v[idx])
                hat = _corrected(hat, idx, v[idx]).reshape(p.shape)
            else:
                tau = values.astype(np.float32).reshape(-1) - base.astype(np.float32).reshape(-1)
                lr = None
                if key in self.lowrank:
                    q, scale = lowrank_small(tau, p.shape, self.spec.step)
                    lr = self.lowrank[key] = (q, scale, b"\x00" + q.tobytes())
                self.stored[key] = _delta_codes(self.spec, p.shape, tau, lr)
                hat = rebuild(base, None, self.stored[key][2], np.empty(p.shape, base.dtype))
        if not np.isfinite(hat.astype(np.float32)).all():
            raise CheckpointError(f"task {self.task!r}, tensor {key!r}: the repair's values rebuild non-finite under "
                                  f"{self.spec.label()}")
        self.targets[key] = hat
        return hat


def _corrected(hat: np.ndarray, idx: np.ndarray, value: np.ndarray) -> np.ndarray:
    """A flat θ̂ with correction entries applied as every reader applies them: R(W(θ̂[i]) + v)."""
    out = hat.copy()
    out[idx] = (hat[idx].astype(np.float32) + value.astype(np.float32)).astype(hat.dtype)
    return out


Repair = Callable[[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray], Refit], Mapping[str, np.ndarray]]


def _repair_task(bundle: Bundle, task: str, ckpt: Checkpoint, repair: Repair, refit: Refit,
                 hats: Mapping[str, np.ndarray]) -> None:
    """Run the repair for ``task``: it gets θ_t (the checkpoint's merged params, with the bundle's
    carried and private tensors: a full state dict) and θ̂_t (``hats``, the codec's rebuild); what
    it returns is stored as ``refit`` stores it."""
    teacher = {p.name: bundle.task_weight(task, p) for p in bundle.params if p.role != "merged"}  # carried
    teacher.update(bundle.private(task))
    student = dict(teacher)
    for p in bundle.merged:
        teacher[p.name] = np.asarray(_read_task(ckpt, p.name, bundle, task, p.shape))
        student[p.name] = hats[p.name].reshape(p.shape)
    given = repair(task, teacher, student, refit)
    for name, values in given.items():  # what the callback returns is stored as the codec stores it
        if bundle.resolve(name) not in refit.targets or not np.array_equal(refit.targets[bundle.resolve(name)], values):
            refit(name, values)


def _encode_task(bundle: Bundle, task: str, ckpt: Checkpoint | None, spec: CodecSpec, election: _Election | None = None,
                 repair: Repair | None = None) -> _TaskOut:
    """One task's planes, scales, δ and correction (``ckpt`` None: a plain TALL task, re-stored).
    Tensor by tensor; a correction needs the whole task's error and rebuilt values in memory
    (8 bytes per merged parameter) to pick its largest entries; a repair (``spec.repair``) the
    task's θ_t and θ̂_t whole (twice the task's weights)."""
    total = sum(p.numel for p in bundle.merged)
    k_fix = int(round(spec.correction * total))
    codec = Codec(spec.name, spec.planes if spec.name != "delta" else "raw", spec.dtype if spec.name == "delta" else None, k_fix,
                  spec.scale if spec.name == "tall" else "none", spec.codes if spec.name == "delta" else "raw")
    out = _TaskOut(codec, private=spec.private)
    errors: list[np.ndarray] = []
    rebuilt: list[np.ndarray] = []
    kept = 0
    lowrank = {}
    if ckpt is not None and spec.name == "delta" and spec.codes == "lowrank":  # the ranks are allotted over the whole task
        taus = [(_read_task(ckpt, p.name, bundle, task, p.shape).astype(np.float32).reshape(-1)
                 - bundle.base(p.name).astype(np.float32).reshape(-1), p.shape) for p in bundle.merged]
        lowrank = dict(zip((p.name for p in bundle.merged), lowrank_task(taus, spec)))
        del taus
    refits: dict[str, tuple[np.ndarray, np.ndarray | None, Recipe]] = {}
    fixing = ckpt is not None and spec.repair != "none" and spec.name != "delta"  # re-fit values as correction entries
    if ckpt is not None and spec.repair != "none":
        if repair is None:
            raise ConfigError(f"task {task!r}: codec {spec.label()} re-fits its norm layers on calibration inputs: pass "
                              "repair= (edgemerge.repair.norm_repair(build, inputs)); the CLI has no model to run")
        if spec.name == "delta":  # the re-fit values replace the params' codes: known before the loop stores them
            hats = {}
            for p in bundle.merged:
                base = bundle.base(p.name)
                tau = _read_task(ckpt, p.name, bundle, task, p.shape).astype(np.float32).reshape(-1) - base.astype(np.float32).reshape(-1)
                with np.errstate(over="ignore", invalid="ignore"):
                    hats[p.name] = rebuild(base, None, _delta_codes(spec, p.shape, tau, lowrank.get(p.name))[2],
                                           np.empty(p.shape, base.dtype))
            refit = Refit(bundle, task, spec, lowrank)
            _repair_task(bundle, task, ckpt, repair, refit, hats)  # lowrank: the re-fit small params' records updated
            refits = refit.stored
            out.repaired = len(refit.targets)
    for p in bundle.merged:
        base = bundle.base(p.name)
        d: dict[str, np.ndarray] = {}
        out.planes.append(d)
        if ckpt is None:
            d["presence"] = unpack_bits(bundle.tall_presence(task, p.name), p.numel)
            continue
        theta = _read_task(ckpt, p.name, bundle, task, p.shape)
        tau = theta.astype(np.float32).reshape(-1) - base.astype(np.float32).reshape(-1)
        if spec.name == "tall":
            packed = bundle.tall_presence(task, p.name)
            if spec.planes == "xz":
                d["presence"] = unpack_bits(packed, p.numel)
            r = Recipe("tall", presence=packed)
            if codec.scale == "ls":  # s = <m⊙τ_MTL, τ_t> / ‖m⊙τ_MTL‖², in float64, stored as float32
                on = np.ones(p.numel, bool) if packed is None else unpack_bits(packed, p.numel)
                mv = np.where(on, bundle.vector(p.name).reshape(-1).astype(np.float64), 0.0)
                den = float(np.dot(mv, mv))
                sc = np.float32(float(np.dot(mv, tau.astype(np.float64))) / den if den > 0 else 1.0)
                out.scales.append(float(sc))
                r = Recipe("tall", presence=packed, scale=float(sc), scaled=True)
        elif spec.name == "emr":
            keep = election.masks[(task, p.name)]
            d["presence"] = keep
            out.scales.append(election.rescale[task])
            kept += int(keep.sum())
            r = Recipe("tall", presence=pack_bits(keep), scale=election.rescale[task], scaled=True)
        elif spec.name == "tswitch":
            keep, neg, scale = tswitch_planes(tau, spec.density)
            d["presence"], d["signs"] = keep, neg[keep]
            out.scales.append(float(scale))
            kept += int(keep.sum())
            r = Recipe("tswitch", presence=pack_bits(keep), sign=pack_bits(neg & keep), scale=float(scale))
        else:
            # a re-fit param is stored as the repair's refit stored it (its error is still measured against θ_t)
            stored, scale, r = refits[p.name] if p.name in refits else _delta_codes(spec, p.shape, tau, lowrank.get(p.name))
            if scale is None:
                out.deltas[p.name] = stored.reshape(p.shape)
            else:
                out.deltas[p.name] = stored.reshape(p.shape) if spec.dtype == "I8" else pack_nibbles(stored)
                out.dscales[p.name] = scale
            if lowrank:
                out.records[p.name] = lowrank[p.name][2]
        with np.errstate(over="ignore", invalid="ignore"):
            vector = bundle.vector(p.name) if codec.shared else election.vector[p.name] if spec.name == "emr" else None
            hat = rebuild(base, vector, r, np.empty(p.shape, base.dtype))
        if not np.isfinite(hat.astype(np.float32)).all():  # e.g. a τ beyond float16's range stored as F16
            raise CheckpointError(f"task {task!r}, tensor {p.name!r}: codec {spec.label()} rebuilds non-finite values; "
                                  "choose another (delta:dtype=BF16 or F32 keeps the range)")
        err = theta.astype(np.float32).reshape(-1) - hat.astype(np.float32).reshape(-1)
        if k_fix or fixing:
            errors.append(err)
            rebuilt.append(hat.reshape(-1))
        else:
            out.sq_err += float(np.dot(err.astype(np.float64), err))
        out.sq_ref += float(np.dot(tau.astype(np.float64), tau))
    total_kept = {"tswitch": kept, "emr": kept, "delta": total}.get(spec.name)
    out.density = None if total_kept is None or not total else total_kept / total
    picks: list[np.ndarray] = []
    values: list[np.ndarray] = []
    if k_fix:
        allerr = np.abs(np.concatenate(errors))
        pick = np.sort(np.argpartition(allerr, allerr.size - k_fix)[allerr.size - k_fix :])
        start = 0
        for err in errors:
            picks.append(pick[(pick >= start) & (pick < start + err.size)] - start)
            start += err.size
        values = [err[idx].astype(np.float16) for err, idx in zip(errors, picks)]
    elif fixing:  # the repair's values, as its refit stored them: the codec's θ̂_t + correction entries there
        refit = Refit(bundle, task, spec, lowrank, {p.name: hat for p, hat in zip(bundle.merged, rebuilt)})
        _repair_task(bundle, task, ckpt, repair, refit, refit.hats)
        none = (np.zeros(0, np.int64), np.zeros(0, np.float16))
        picks, values = zip(*(refit.fixes.get(p.name, none) for p in bundle.merged)) if bundle.merged else ((), ())
        out.repaired = len(refit.targets)
        out.codec = replace(out.codec, correction=sum(v.size for v in values))
    for i, (err, hat, idx, value) in enumerate(zip(errors, rebuilt, picks, values)):
        fix = np.zeros(err.size, bool)
        fix[idx] = True
        out.planes[i]["fix"] = fix
        out.fixes.append(value)
        corrected = _corrected(hat, idx, value)
        e2 = err + hat.astype(np.float32) - corrected.astype(np.float32)
        out.sq_err += float(np.dot(e2.astype(np.float64), e2))
    return out


def encode_bundle(bundle: str | Bundle, tasks: Mapping[str, str], codecs: Mapping[str, CodecSpec], output: str,
                  progress: Callable[[str, int, int], None] | None = None,
                  notes: Mapping[str, Mapping[str, Any]] | None = None, repair: Repair | None = None) -> dict[str, Any]:
    """Write ``output``: the bundle's θ0, heads and statistics, each task re-encoded with its codec
    (``codecs``: task -> CodecSpec; tasks not named keep ``tall``). ``tasks``: task -> the
    checkpoint it was merged from (tswitch, delta and corrections need θ_t itself; each file given
    is checked against the sha256 the bundle recorded, and the task's ``relative_error`` measured
    against it). ``notes``: task -> extra keys for its codec
    entry (what chose it). ``repair``: what a codec with ``repair=norm`` calls,
    ``repair(task, θ_t, θ̂_t, refit) -> {param: values}`` (``edgemerge.repair.norm_repair``); the
    params it returns are stored as ``refit`` rounds them and counted in the entry's ``repaired``.
    Returns the new manifest."""
    b = open_bundle(bundle) if isinstance(bundle, (str, os.PathLike)) else bundle
    unknown = sorted(set(codecs) - set(b.tasks))
    if unknown:
        raise ConfigError(f"{b.path}: codecs given for unknown task(s) {', '.join(unknown)}; tasks: {', '.join(b.tasks)}")
    if b.version >= 2:
        raise ConfigError(f"{b.path} is already a v2 bundle; encode from the merged (v1) bundle")
    if os.path.abspath(output) in {os.path.abspath(b.path), *(os.path.abspath(p) for p in tasks.values())}:
        raise ConfigError(f"output {output} is one of the inputs; choose another path")
    specs = {t: codecs.get(t, CodecSpec("tall", planes="raw")) for t in b.tasks}
    for t, s in specs.items():
        if s.name == "tall" and b.mask_policy != "tall" and s.planes == "xz":
            raise ConfigError(f"task {t!r}: {b.path} has no TALL masks to compress (merged with --masks none)")
    need = [t for t, s in specs.items() if s.name != "tall" or s.correction or s.scale != "none" or s.repair != "none"]
    missing = [t for t in need if t not in tasks]
    if missing:
        raise ConfigError(f"task(s) {', '.join(missing)} need their checkpoint for codec {specs[missing[0]].name}: "
                          "pass --task NAME=PATH")
    emr = [t for t, s in specs.items() if s.name == "emr"]
    missing = [t for t in b.tasks if t not in tasks]
    if emr and missing:
        raise ConfigError(f"codec emr (task {emr[0]!r}) elects its vector from every task: pass the checkpoints of "
                          f"{', '.join(missing)} too (--task NAME=PATH)")
    use = [t for t in b.tasks if t in tasks]  # every task given its checkpoint is measured against it
    sources = {t["name"]: t.get("source", {}) for t in b.manifest["tasks"]}
    for t in use:
        want = sources[t].get("sha256")
        if want and os.path.isfile(tasks[t]) and file_sha256(tasks[t]) != want:
            raise CheckpointError(f"{tasks[t]} is not the checkpoint task {t!r} was merged from (sha256 differs from "
                                  f"the bundle's record); pass the same file")
    election = _elect(b, tasks, emr) if emr else None
    outs: dict[str, _TaskOut] = {}
    for i, t in enumerate(b.tasks):
        if progress:
            progress("encode", i, len(b.tasks))
        if t in use:
            ckpt = open_checkpoint(tasks[t])
            try:
                outs[t] = _encode_task(b, t, ckpt, specs[t], election, repair)
            finally:
                ckpt.close()
        elif specs[t].planes == "xz":
            outs[t] = _encode_task(b, t, None, specs[t])
        else:
            outs[t] = _TaskOut(Codec("tall", "raw"), private=specs[t].private)
    if progress:
        progress("encode", len(b.tasks), len(b.tasks))
    return _write_v2(b, outs, output, notes or {}, election)


@dataclass
class _Election:
    """EMR-Merging's elect step over every task: the elected vector u (the bundle's vector dtype),
    and for the emr tasks their masks m_t and rescalers λ_t."""

    vector: dict[str, np.ndarray]
    masks: dict[tuple[str, str], np.ndarray]
    rescale: dict[str, float]


def _elect(b: Bundle, tasks: Mapping[str, str], emr: list[str]) -> _Election:
    """Per merged param, from every task's τ_t (float32): the elected sign σ = +1 where Σ_t τ_t > 0,
    else −1; m_t = τ_t·σ > 0; u = σ · max_t |m_t ⊙ τ_t|. Per emr task, λ_t = Σ_p mean|τ_t| ÷
    Σ_p mean|m_t ⊙ u| over the merged params (1 where the divisor is 0) -- the reference
    implementation's rescaler (harveyhuang18/EMR_Merging)."""
    ckpts = {t: open_checkpoint(tasks[t]) for t in b.tasks}
    try:
        out = _Election({}, {}, {})
        num, den = dict.fromkeys(emr, 0.0), dict.fromkeys(emr, 0.0)
        for p in b.merged:
            base = b.base(p.name).astype(np.float32).reshape(-1)
            taus = {t: _read_task(c, p.name, b, t, p.shape).astype(np.float32).reshape(-1) - base for t, c in ckpts.items()}
            sigma = np.where(sum(v.astype(np.float64) for v in taus.values()) > 0, np.float32(1), np.float32(-1))
            masks = {t: v * sigma > 0 for t, v in taus.items()}
            u32 = sigma * np.max([np.where(masks[t], np.abs(v), np.float32(0)) for t, v in taus.items()], axis=0)
            with np.errstate(over="ignore"):  # a u beyond F16 is refused where it is rebuilt, naming the tensor
                u = u32.astype(DTYPES[b.vector_dtype])
            out.vector[p.name] = u.reshape(p.shape)
            for t in emr:
                out.masks[(t, p.name)] = masks[t]
                num[t] += float(np.abs(taus[t]).mean(dtype=np.float64)) if p.numel else 0.0
                den[t] += float(np.abs(np.where(masks[t], u.astype(np.float32), 0)).mean(dtype=np.float64)) if p.numel else 0.0
        out.rescale = {t: float(np.float32(num[t] / den[t])) if den[t] > 0 else 1.0 for t in emr}
        return out
    finally:
        for c in ckpts.values():
            c.close()


def _write_v2(b: Bundle, outs: dict[str, _TaskOut], output: str, notes: Mapping[str, Mapping[str, Any]],
              election: _Election | None = None) -> dict[str, Any]:
    shared = any(o.codec.shared for o in outs.values())
    tensors: dict[str, np.ndarray] = {}
    for p in b.params:
        tensors[base_name(p.name)] = b.base(p.name)
        if p.role == "merged" and shared:
            tensors[vector_name(p.name)] = b.vector(p.name)
        if p.role == "merged" and election is not None:
            tensors[elected_name(p.name)] = election.vector[p.name]
    numels = [p.numel for p in b.merged]
    merged_total = sum(numels)
    entries = {t["name"]: dict(t) for t in b.manifest["tasks"]}
    for t, o in outs.items():
        blob = encode_planes(o.codec, o.planes) if o.codec.uses_planes_tensor else None
        if o.codec.planes == "xz":
            raw = encode_planes(replace(o.codec, planes="raw"), o.planes)
            if len(blob) >= len(raw):  # xz loses on tiny tensors: keep what is smaller
                o.codec = replace(o.codec, planes="raw")
                blob = raw if o.codec.uses_planes_tensor else None
        codes = None
        if o.codec.uses_codes_tensor:
            if o.codec.codes == "lowrank":  # the records of the factors (the codes they rebuild are o.deltas)
                codes = np.frombuffer(xz_stream(b"".join(o.records[p.name] for p in b.merged)), dtype=np.uint8)
            else:
                codes = encode_codes(o.codec.dtype, [o.deltas[p.name] for p in b.merged])
            if len(codes) >= sum(d.nbytes for d in o.deltas.values()):  # the stream loses (tiny or dense codes): keep them raw
                if o.codec.codes == "lowrank":  # raw codes hold a scale per row: lowrank's one, broadcast (the same weights)
                    o.dscales = {p.name: np.repeat(o.dscales[p.name], quant_rows(p.shape) // o.dscales[p.name].size) for p in b.merged}
                o.codec, codes = replace(o.codec, codes="raw"), None
        half = []
        for k, v in b.private(t).items():  # with private=F16 / BF16, the float32 ones in that dtype
            if o.private != "raw" and v.dtype == np.float32:
                with np.errstate(over="ignore"):
                    v = v.astype(DTYPES[o.private])
                if not np.isfinite(v.astype(np.float32)).all():
                    raise CheckpointError(f"task {t!r}, private tensor {k!r}: beyond {o.private}'s range; "
                                          "encode it with private=BF16 or raw")
                half.append(k)
            tensors[private_name(t, k)] = v
        o.codec = replace(o.codec, private=o.private if half else "raw", private_keys=tuple(half))
        c = o.codec
        if c.name == "tall" and c.planes == "raw" and b.mask_policy == "tall":
            for p in b.merged:
                tensors[mask_name(t, p.name)] = b.tall_presence(t, p.name)
        if blob is not None:
            decode_planes(f"{output}: {planes_name(t)}", c, blob, numels)  # the reader's decode, before writing
            tensors[planes_name(t)] = blob
        if c.has_scales:
            tensors[scales_name(t)] = np.array(o.scales, np.float32)
        if codes is not None:
            back = decode_codes(f"{output}: {dcodes_name(t)}", c, codes, [p.shape for p in b.merged])  # the reader's decode
            if any(x.tobytes() != np.ascontiguousarray(o.deltas[p.name]).reshape(-1).view(np.uint8).tobytes()
                   for x, p in zip(back, b.merged)):
                raise FormatError(f"{output}: task {t!r}: the reader's decode of {dcodes_name(t)} differs from the encoder's codes")
            tensors[dcodes_name(t)] = codes
        else:
            for p, d in o.deltas.items():
                tensors[delta_name(t, p)] = d
        if c.qscale_rows:  # v3: every param's scales in one tensor (a header entry each cost ~25x its 4 bytes)
            for p in b.merged:
                if o.dscales[p.name].shape != (c.qscale_count(p.shape),):
                    raise FormatError(f"{output}: task {t!r}, tensor {p.name!r}: the encoder made {o.dscales[p.name].size} "
                                      f"scales where the format holds {c.qscale_count(p.shape)}")
            tensors[dscales_name(t)] = np.concatenate([o.dscales[p.name] for p in b.merged]).astype(np.float32)
        if c.correction:
            tensors[fix_name(t)] = np.concatenate(o.fixes)
        task_bytes = sum(v.nbytes for k, v in tensors.items() if _belongs(k, t))
        entry = entries[t]
        entry["codec"] = {**c.to_json(), "bits_per_param": round(8 * task_bytes / merged_total, 4) if merged_total else 0.0,
                          **dict(notes.get(t, {}))}
        if c.name != "tall":  # λ_t and the mask density were the TALL mask's
            entry["lambda"], entry["density"] = None, o.density
        if o.repaired:
            entry["codec"]["repaired"] = o.repaired
        if o.sq_ref:
            entry["recon_error"] = math.sqrt(o.sq_err)
            entry["codec"]["relative_error"] = round(math.sqrt(o.sq_err / o.sq_ref), 6)
    manifest = dict(b.manifest)
    # v3 where a v2 reader would misread: scales in one tensor, or half private tensors (a key it would ignore)
    manifest["format_version"] = 3 if any(o.codec.qscale_rows or o.codec.private_keys for o in outs.values()) else 2
    manifest["tool_version"] = __version__
    manifest["tasks"] = [entries[t] for t in b.tasks]
    meta = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)}

    def check(tmp: str) -> None:
        try:
            open_bundle(tmp, verify="open").close()
        except FormatError as exc:
            raise FormatError(f"{str(exc).replace(tmp, output)} -- the bundle reader would refuse it, so nothing was written") from None

    write_safetensors(output, tensors, meta, check=check)
    return manifest


def _belongs(name: str, task: str) -> bool:
    """A tensor of ``task``'s own codec data (what ``inspect.codec_bytes`` counts)."""
    kind, _, rest = name.partition("/")
    return kind in PER_TASK and rest.split("/", 1)[0] == task


# -- choosing a codec per task --------------------------------------------------------------------

CANDIDATES = ("tswitch:density=0.05", "tswitch:density=0.1", "tswitch:density=0.2", "tswitch:density=0.3",
              "delta:dtype=I8,codes=lowrank,bits=0.35", "delta:dtype=I8,codes=lowrank,bits=0.5", "delta:dtype=I8,codes=lowrank,bits=0.75",
              "delta:dtype=I8,codes=lowrank,bits=1", "delta:dtype=I8,codes=lowrank,bits=1.5",
              "delta:dtype=I8,codes=lowrank,bits=2", "delta:dtype=I8,codes=lowrank,bits=3",
              "tswitch:density=0.3,correction=0.01", "tall:planes=xz", "tall:planes=xz,scale=ls", "emr:planes=xz",
              "delta:dtype=I4,qmax=2,codes=xz", "delta:dtype=I4,codes=xz",
              "delta:dtype=I8,fit=step,step=2,codes=xz", "delta:dtype=I8,fit=step,step=1,codes=xz", "delta:dtype=I8,fit=step,step=0.7,codes=xz",
              "delta:dtype=I8,fit=step,step=0.5,codes=xz", "delta:dtype=I8,fit=step,step=0.35,codes=xz",
              "delta:dtype=I8,fit=step,step=0.25,codes=xz", "delta:dtype=I8,fit=step,step=0.18,codes=xz", "delta:dtype=I8,fit=step,step=0.12,codes=xz",
              "delta:dtype=I8,codes=xz", "delta:dtype=I8", "delta:dtype=F16")
FALLBACK = "delta:dtype=F16"
Score = Callable[[str, Mapping[str, np.ndarray]], float]


@dataclass
class Choice:
    task: str
    spec: CodecSpec
    bits: float                  # bits per merged param the task adds (its share of τ_MTL included for tall)
    normalized: float            # validation score of θ̂_t / that of θ_t, in percent
    met: bool                    # False: no candidate met the target, the fallback was taken
    tried: list[tuple[str, float, float]] = field(default_factory=list)   # (spec, bits, normalized)


def weight_fidelity(relative_error: float) -> float:
    """The data-free proxy (no ``score``): the share of τ_t's energy the rebuilt weights keep,
    ``100 · (1 − ‖θ̂_t − θ_t‖² / ‖θ_t − θ0‖²)`` over the merged params, in percent.
    bench/frontier_bench.py measures how it relates to accuracy: conservative (a codec that keeps
    99% of accuracy may keep far less of τ_t's energy), never a substitute for validation data."""
    return 100.0 * (1.0 - relative_error ** 2)


def select_codecs(bundle: str, tasks: Mapping[str, str], score: Score | None, target: float, scratch: str,
                  candidates: tuple[str, ...] = CANDIDATES,
                  progress: Callable[[str, int, int], None] | None = None, repair: Repair | None = None) -> dict[str, Choice]:
    """For each task, the cheapest candidate whose rebuilt model scores ≥ ``target`` percent of the
    task's own checkpoint on validation data (``score(task, state_dict)``, e.g. accuracy; ``None``:
    the data-free ``weight_fidelity``), else ``FALLBACK``. Each candidate is encoded into ``scratch``
    (a file path) and read back through the runtime, so what is scored is what a device rebuilds;
    ``repair`` serves the candidates with ``repair=norm`` (``encode_bundle``)."""
    check_target(target)
    return {t: choose(t, tried, target)
            for t, tried in try_candidates(bundle, tasks, score, scratch, candidates, progress, repair).items()}


def check_target(target: float) -> None:
    if not (isinstance(target, (int, float)) and 0 < target <= 100):
        raise ConfigError(f"target {target!r} must be a percentage in (0, 100]")


def try_candidates(bundle: str, tasks: Mapping[str, str], score: Score | None, scratch: str,
                   candidates: tuple[str, ...] = CANDIDATES,
                   progress: Callable[[str, int, int], None] | None = None,
                   repair: Repair | None = None) -> dict[str, list[tuple[str, float, float]]]:
    """Per task, (candidate, bits it adds per merged param, score in % of θ_t's) for every
    candidate (``score=None``: ``weight_fidelity``), ``FALLBACK`` among them even when not listed;
    ``choose`` picks from these for any target without scoring again. A score that is not a
    finite number is a ConfigError."""
    specs = [parse_codec(c) for c in candidates]
    fit = next((c.label() for c in specs if c.repair != "none"), None)
    if fit and repair is None:  # before any work
        raise ConfigError(f"candidate {fit} re-fits norm layers: pass repair= (edgemerge.repair.norm_repair) or drop it")
    if fit and score is None:
        raise ConfigError(f"candidate {fit} needs a validation score: weight fidelity measures the distance to θ_t, "
                          "which the repair leaves on purpose to bring the activations back")
    if parse_codec(FALLBACK) not in specs:  # a target no candidate keeps falls back to it: its score is recorded too
        specs.append(parse_codec(FALLBACK))
    with open_bundle(bundle) as b:
        missing = [t for t in b.tasks if t not in tasks]
        if missing:
            raise ConfigError(f"choosing codecs needs every task's checkpoint; missing: {', '.join(missing)}")
        tall_share = (32 if b.vector_dtype == "F32" else 16) / len(b.tasks)  # a shared vector's bits, split over the tasks
        names = list(b.tasks)
        if b.mask_policy != "tall":  # no masks to compress
            specs = [c for c in specs if not (c.name == "tall" and c.planes == "xz")]
    out: dict[str, list[tuple[str, float, float]]] = {}
    total = len(names) * len(specs)
    try:
        for i, t in enumerate(names):
            ref = None
            if score is not None:
                ckpt = open_checkpoint(tasks[t])
                try:
                    ref = finite_score(score(t, {k: ckpt.read(k) for k in ckpt.keys()}), f"task {t!r} (its own checkpoint)")
                finally:
                    ckpt.close()
            out[t] = []
            for j, spec in enumerate(specs):
                if progress:
                    progress("choose codecs", i * len(specs) + j, total)
                m = encode_bundle(bundle, tasks if spec.name == "emr" else {t: tasks[t]}, {t: spec}, scratch,  # emr elects from all
                                  repair=repair)
                entry = next(e for e in m["tasks"] if e["name"] == t)["codec"]
                bits = entry["bits_per_param"] + (tall_share if spec.name in ("tall", "emr") else 0.0)
                if score is None:
                    got = weight_fidelity(entry["relative_error"])
                else:
                    with open_bundle(scratch) as v2:
                        got = 100 * finite_score(score(t, v2.task_weights(t)), f"task {t!r} ({spec.label()})") / ref if ref else 0.0
                out[t].append((spec.label(), bits, got))
    finally:  # the scratch candidate goes, after an error too
        if os.path.exists(scratch):
            os.unlink(scratch)
    if progress:
        progress("choose codecs", total, total)
    return out


def choose(task: str, tried: list[tuple[str, float, float]], target: float) -> Choice:
    """The cheapest tried candidate at or above ``target``; else ``FALLBACK`` (met=False)."""
    ok = [(bits, k) for k, (_, bits, norm) in enumerate(tried) if norm >= target]
    if ok:
        k = min(ok)[1]
        return Choice(task, parse_codec(tried[k][0]), tried[k][1], tried[k][2], True, tried)
    fb = parse_codec(FALLBACK)
    k = next((k for k, (label, _, _) in enumerate(tried) if parse_codec(label) == fb), None)
    return Choice(task, fb, tried[k][1] if k is not None else 16.0, tried[k][2] if k is not None else float("nan"), False, tried)


def choice_notes(choices: Mapping[str, Choice], target: float, criterion: str = "validation") -> dict[str, dict[str, Any]]:
    """What the manifest records about each choice (``encode_bundle(notes=...)``); ``criterion``:
    'validation' (a score callback) or 'weight fidelity' (the data-free proxy)."""
    def pct(x: float) -> float | None:  # a score never measured (a fallback not among the tried) is null, not NaN
        return round(x, 3) if math.isfinite(x) else None

    return {t: {"chosen_by": {"target": target, "criterion": criterion, "score": pct(c.normalized), "met": c.met,
                              "tried": [{"codec": s, "bits": round(b, 4), "normalized": pct(n)} for s, b, n in c.tried]}}
            for t, c in choices.items()}
