"""The mask kernel: θ_t = θ0 + m_t ⊙ τ_MTL, defined as a select so it is bit-exact everywhere.

    out[i] = θ0[i] + τ[i]   if bit i of the packed mask is set (big bit order)
    out[i] = θ0[i]          otherwise

computed in float32 and rounded once to θ0's dtype. (A select, not ``θ0 + m·τ``: the product form
turns θ0 = -0.0 into +0.0 where the mask is off, and the C applier and GPU kernels must agree.)

Implementations, all bit-identical (tested): ``apply_mask_reference`` (plain numpy, the
definition); ``apply_mask`` (the one to call) picks, for float16 and bfloat16 θ0 (τ in float32 or
θ0's type), the C kernel's half loop (AVX2 + F16C, non-temporal stores; scalar elsewhere), and for
float32 the first of: the C kernel
(``_cmask.c``, built with the package where a compiler was found) when it has its AVX2 loop with
non-temporal stores, run by one thread per core on slices of the array; a fused numba loop; the C
kernel's scalar loop; else (and for other dtypes) a blocked numpy pass that keeps temporaries small.
``kernel_name()`` says which one runs. ``EDGEMERGE_NO_C=1`` / ``EDGEMERGE_NO_NUMBA=1`` switch one off.
The C paths run as jobs of a C plan (``c_job``, ``run_jobs``): one param here, every param of a
task in ``codecs.SwitchPlan``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .bits import BIT_ORDER, packed_nbytes, unpack_bits
from .dtypes import DTYPES

BLOCK = 1 << 20  # elements per numpy block (a multiple of 8, so blocks start on mask bytes)
SPLIT = 1 << 18  # arrays at least this long are split across threads for the C kernel


def apply_mask_reference(base: np.ndarray, vector: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain numpy version of the kernel; the reference every fast path is tested against."""
    mask = unpack_bits(packed, base.size).reshape(base.shape)
    b32 = base.astype(np.float32, copy=False)
    res = np.where(mask, b32 + vector.astype(np.float32, copy=False), b32)
    if out is None:
        return res.astype(base.dtype, copy=False)
    np.copyto(out, res.reshape(out.shape), casting="unsafe")
    return out


def _apply_blocked(base: np.ndarray, vector: np.ndarray, packed: np.ndarray, out: np.ndarray) -> None:
    b, v, o = base.reshape(-1), vector.reshape(-1), out.reshape(-1)
    same = b.dtype == v.dtype == o.dtype == np.float32
    for s in range(0, b.size, BLOCK):
        e = min(b.size, s + BLOCK)
        m = np.unpackbits(packed[s // 8 : (e + 7) // 8], count=e - s, bitorder=BIT_ORDER).view(bool)
        if same:  # copy θ0, then add τ only where the bit is set: the select, without temporaries
            np.copyto(o[s:e], b[s:e])
            np.add(b[s:e], v[s:e], out=o[s:e], where=m)
            continue
        bb = b[s:e].astype(np.float32, copy=False)
        np.copyto(o[s:e], np.where(m, bb + v[s:e].astype(np.float32, copy=False), bb), casting="unsafe")


_FUSED = None


def numba_module():
    """numba, or None when it is not installed or ``EDGEMERGE_NO_NUMBA=1`` asks for plain numpy."""
    if os.environ.get("EDGEMERGE_NO_NUMBA") == "1":
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


def _fused():
    """The numba kernel (compiled once, cached on disk), or None without numba / when disabled."""
    global _FUSED
    if _FUSED is None:
        _FUSED = False
        numba = numba_module()
        if numba is not None:

            @numba.njit(parallel=True, cache=True, nogil=True)
            def fused(base, vector, packed, out):  # pragma: no cover - compiled
                # One flat parallel loop: LLVM vectorizes the per-element bit test and select
                # (measured faster than looping over mask bytes; see bench/switch_bench.py).
                for i in numba.prange(base.shape[0]):
                    if (packed[i >> 3] >> (7 - (i & 7))) & 1:
                        out[i] = base[i] + vector[i]
                    else:
                        out[i] = base[i]

            _FUSED = fused
    return _FUSED or None


_C = None
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _cmask():
    """The C kernel module, or None when it was not built or ``EDGEMERGE_NO_C=1``."""
    global _C
    if _C is None:
        _C = False
        if os.environ.get("EDGEMERGE_NO_C") != "1":
            try:
                from . import _cmask as c
                _C = c
            except ImportError:
                pass
    return _C or None


_WORKERS = os.cpu_count() or 1


def _apply_c(run, n: int) -> None:
    """``run(start, stop)`` over [0, n), split across one thread per core for large arrays."""
    global _POOL
    workers = _WORKERS
    if n < SPLIT or workers == 1:
        run(0, n)
        return
    with _POOL_LOCK:  # sessions may switch from several threads; one pool for the process
        if _POOL is None:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="edgemerge-kernel")
    cuts = [n * k // workers for k in range(workers + 1)]
    list(_POOL.map(lambda k: run(cuts[k], cuts[k + 1]), range(workers)))


# ops of a C job (_cmask.c): what x and y of the job hold
OP_SELECT, OP_HALF, OP_F32H, OP_SIGN, OP_Q8, OP_SCALED = range(6)  # x, y: vector + mask (select ops), presence + sign,
# codes + scales; OP_SCALED: vector + mask, the vector times the job's scale
_NO_FIX = (np.zeros(0, np.int64), np.zeros(0, np.float32))


def c_job(op: int, base, x, y, out, scale: float = 0.0, bk: int = 0, vk: int = 0, cols: int = 0, axis: int = 0,
          nib: int = 0, fix: tuple[np.ndarray, np.ndarray] = _NO_FIX) -> tuple:
    """One rebuild as the C plan takes it (flat buffers; ``fix``: increasing int64 positions and
    float32 values of a correction, applied after the op)."""
    return (op, base, x, y, out, np.ascontiguousarray(fix[0], np.int64), np.ascontiguousarray(fix[1], np.float32),
            float(scale), bk, vk, cols, axis, nib)


def run_jobs(jobs: list[tuple]) -> None:
    """Run C jobs as one plan: one call (one per thread for large plans) over all their elements."""
    c = _cmask()
    plan = c.plan(jobs)
    _apply_c(lambda s, e: c.run_plan(plan, s, e), c.plan_size(plan))


# the C kernel's half-precision kinds; a vector is float32 or the base's own type
_HALF_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
if "BF16" in DTYPES:
    _HALF_KINDS[DTYPES["BF16"]] = 2


def _half_pair(dtype, vector_dtype) -> tuple[int, int] | None:
    """(base kind, vector kind) for the C half kernel, or None when it does not take the pair."""
    bk, vk = _HALF_KINDS.get(np.dtype(dtype)), _HALF_KINDS.get(np.dtype(vector_dtype))
    return (bk, vk) if bk in (1, 2) and vk in (0, bk) else None


def kernel_name(dtype=np.float32, vector_dtype=None) -> str:
    """Which implementation ``apply_mask`` runs for a θ0 of ``dtype`` and a τ of ``vector_dtype``
    (default: the same): 'c-avx2', 'numba', 'c-scalar' or 'numpy'."""
    dtype = np.dtype(dtype)
    vector_dtype = dtype if vector_dtype is None else np.dtype(vector_dtype)
    c = _cmask()
    if dtype == np.float32 and _HALF_KINDS.get(vector_dtype) in (1, 2) and c is not None:  # a half delta
        return "c-avx2" if c.simd_half() != "scalar" else "c-scalar"
    if dtype != np.float32 or vector_dtype != np.float32:
        if c is None or _half_pair(dtype, vector_dtype) is None:
            return "numpy"
        return "c-avx2" if c.simd_half() != "scalar" else "c-scalar"
    if c is not None and c.simd() != "scalar":
        return "c-avx2"
    return "numba" if _fused() is not None else "c-scalar" if c is not None else "numpy"


_ALL_SET = np.zeros(0, np.uint8)


def _all_set(nbytes: int) -> np.ndarray:
    """A read-only mask with every bit set (no mask, a delta), from one buffer grown as needed."""
    global _ALL_SET
    if _ALL_SET.size < nbytes:
        grown = np.full(max(nbytes, 2 * _ALL_SET.size), 0xFF, np.uint8)
        grown.flags.writeable = False
        _ALL_SET = grown
    return _ALL_SET[:nbytes]


def select_job(base: np.ndarray, vector: np.ndarray, packed: np.ndarray, out: np.ndarray) -> tuple | None:
    """The C job of the select (operands checked by ``select_operands``), or None where ``kernel_name``
    picks numba or numpy."""
    name = kernel_name(base.dtype, vector.dtype) if base.size else "numpy"
    if name not in ("c-avx2", "c-scalar"):
        return None
    b, v, o = (np.ascontiguousarray(a).reshape(-1) for a in (base, vector, out))
    m = np.ascontiguousarray(packed)
    if base.dtype == np.float32 and vector.dtype != np.float32:
        return c_job(OP_F32H, b, v.view(np.uint16), m, o, vk=_HALF_KINDS[vector.dtype])
    pair = _half_pair(base.dtype, vector.dtype)
    if pair is None:
        return c_job(OP_SELECT, b, v, m, o)
    # the buffer protocol does not know bfloat16: hand over the bits
    return c_job(OP_HALF, b.view(np.uint16), v if pair[1] == 0 else v.view(np.uint16), m, o.view(np.uint16), bk=pair[0], vk=pair[1])


def check_out(base: np.ndarray, out: np.ndarray) -> None:
    if out.shape != base.shape or out.dtype != base.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {base.dtype} array of shape {base.shape}")


def select_operands(base: np.ndarray, packed: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """Check ``out`` and the mask against θ0; the mask to use (``None``: every bit set)."""
    check_out(base, out)
    if packed is None:
        return _all_set(packed_nbytes(base.size))
    if packed.size != packed_nbytes(base.size):
        unpack_bits(packed, base.size)  # raises the FormatError with the counts
    return packed


def apply_mask(base: np.ndarray, vector: np.ndarray, packed: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """Write θ_t into ``out`` (preallocated, θ0's shape and dtype). ``packed=None``: all bits set."""
    packed = select_operands(base, packed, out)
    job = select_job(base, vector, packed, out)
    if job is not None:
        run_jobs([job])
    elif (base.size and kernel_name(base.dtype, vector.dtype)) == "numba":
        _fused()(base.reshape(-1), vector.reshape(-1), packed, out.reshape(-1))
    else:
        _apply_blocked(base, vector, packed, out)
    return out
