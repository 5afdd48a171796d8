"""Fused single-pass kernels (numba) for the merge's hot loops, with the numpy code as fallback.

numba is optional (``pip install 'edgemerge[fast]'``). Each kernel here computes exactly what its
numpy twin computes -- the same float32 operations in the same order, so buckets, masks and
vectors are bit-identical (tested); only float64 error sums may differ in the last bits, since
they are associated differently. Set ``EDGEMERGE_NO_NUMBA=1`` to force the numpy path.
"""

from __future__ import annotations

import numpy as np

from .runtime.kernel import numba_module

_JIT = None


def jit():
    """numba.njit configured for these kernels, or None when numba is absent or disabled."""
    global _JIT
    if _JIT is None:
        numba = numba_module()
        _JIT = False if numba is None else (lambda f: numba.njit(cache=True, nogil=True, fastmath=False)(f))
    return _JIT or None


_kernels: dict[str, object] = {}


def kernel(name: str):
    """The compiled kernel ``name`` (compiled on first use), or None without numba."""
    j = jit()
    if j is None:
        return None
    if name not in _kernels:
        _kernels[name] = j(globals()["_" + name])
    return _kernels[name]


def _tall_update(tau, vec, lam, bucket, off_sq, on_sq, count):  # pragma: no cover - compiled
    """b = #{j: |τ| > λ_j·|v − τ|}; per bucket Σ|τ|², Σ|v − τ|², count. Returns Σ|τ|²."""
    total = 0.0
    for i in range(tau.shape[0]):
        t = tau[i]
        a = abs(t)
        d = abs(vec[i] - t)
        b = 0
        for j in range(lam.shape[0]):
            if a > lam[j] * d:
                b += 1
        bucket[i] = b
        a64 = np.float64(a)
        d64 = np.float64(d)
        off_sq[b] += a64 * a64
        on_sq[b] += d64 * d64
        count[b] += 1
        total += a64 * a64
    return total


def _hist_hi(tau, hist):  # pragma: no cover - compiled
    bits = np.abs(tau).view(np.uint32)
    for i in range(bits.shape[0]):
        hist[bits[i] >> 16] += 1


def _hist_lo(tau, hi_bin, hist):  # pragma: no cover - compiled
    bits = np.abs(tau).view(np.uint32)
    for i in range(bits.shape[0]):
        if (bits[i] >> 16) == hi_bin:
            hist[bits[i] & 0xFFFF] += 1


def _ties_merge(taus, thr, use_mean, out, tie_flag, tie_pos):  # pragma: no cover - compiled
    """TIES on one chunk: trim by per-task threshold, elect sign by mass, disjoint mean/sum.

    ``out`` gets the value for a negative (or zero) majority; where the elected sign is exactly 0
    and some trimmed entry is not, ``tie_flag`` is set and ``tie_pos`` holds the positive choice.
    Returns (#positive elections, #negative elections).
    """
    n_tasks, n = taus.shape
    n_pos = 0
    n_neg = 0
    for i in range(n):
        s = np.float32(0.0)
        any_nz = False
        for t in range(n_tasks):
            x = taus[t, i]
            if abs(x) >= thr[t]:
                s += x
                if x != 0:
                    any_nz = True
        neg_sum = np.float32(0.0)
        neg_cnt = 0
        pos_sum = np.float32(0.0)
        pos_cnt = 0
        for t in range(n_tasks):
            x = taus[t, i]
            if abs(x) >= thr[t]:
                if x < 0:
                    neg_sum += x
                    neg_cnt += 1
                elif x > 0:
                    pos_sum += x
                    pos_cnt += 1
        if s > 0:
            n_pos += 1
            v = pos_sum / np.float32(max(pos_cnt, 1)) if use_mean else pos_sum
        else:
            if s < 0:
                n_neg += 1
            v = neg_sum / np.float32(max(neg_cnt, 1)) if use_mean else neg_sum
            if s == 0 and any_nz:
                tie_flag[i] = True
                tie_pos[i] = pos_sum / np.float32(max(pos_cnt, 1)) if use_mean else pos_sum
        out[i] = v
    return n_pos, n_neg
