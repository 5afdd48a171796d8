"""Exact k-th largest magnitude over a whole model without holding it: two histogram passes.

The bit pattern of a non-negative float32, read as uint32, orders like the float. Pass 1 counts
each task's |τ| by the top 16 bits (sign, exponent, 7 mantissa bits: 32768 bins); the bin holding
the k-th element is then known. Pass 2 counts, inside that bin only, the low 16 bits -- which
pins the k-th value exactly. Memory: two small count arrays per task; result: bit-exact equal to
sorting every |τ| of the task (tested against ``np.partition``).

The rank follows the TIES reference (``topk_values_mask``): with d elements and keep fraction K,
k = d − int(d·K) is the (1-based) rank from the bottom, and entries with |τ| ≥ that value are kept.
"""

from __future__ import annotations

import numpy as np

from .fast import kernel

_HI_BINS = 1 << 15   # sign bit is 0 for |x|
_LO_BINS = 1 << 16


def rank_from_bottom(d: int, density: float) -> int:
    """1-based rank (from the smallest) of the threshold element; 0 means keep everything."""
    return d - int(d * density)


def kth_largest_magnitude(tau: np.ndarray, density: float) -> np.float32:
    """Threshold for one array in memory (per-tensor top-k): the reference's k-th value."""
    a = np.abs(tau.astype(np.float32, copy=False)).reshape(-1)
    k = rank_from_bottom(a.size, density)
    if k <= 0:
        return np.float32(0)
    return np.float32(np.partition(a, k - 1)[k - 1])


class KthMagnitude:
    """Streaming, exact threshold per task: ``add`` chunks in pass 1, ``refine``, ``add`` again in pass 2."""

    def __init__(self, n_tasks: int, density: float):
        self.density = density
        self.hi = np.zeros((n_tasks, _HI_BINS), dtype=np.int64)
        self.lo = np.zeros((n_tasks, _LO_BINS), dtype=np.int64)
        self.bin = np.zeros(n_tasks, dtype=np.int64)
        self.rank = np.zeros(n_tasks, dtype=np.int64)

    def add(self, stage: int, task: int, tau: np.ndarray) -> None:
        if stage == 2 and self.bin[task] < 0:
            return  # this task keeps everything: nothing to refine
        fused = kernel("hist_hi" if stage == 1 else "hist_lo")
        if fused is not None:
            flat = np.ascontiguousarray(tau, dtype=np.float32).reshape(-1)
            if stage == 1:
                fused(flat, self.hi[task])
            else:
                fused(flat, np.uint32(self.bin[task]), self.lo[task])
            return
        bits = np.abs(tau.astype(np.float32, copy=False)).reshape(-1).view(np.uint32)
        if stage == 1:
            self.hi[task] += np.bincount(bits >> 16, minlength=_HI_BINS)
        else:
            sel = bits[(bits >> 16) == self.bin[task]] & 0xFFFF
            self.lo[task] += np.bincount(sel, minlength=_LO_BINS)

    def refine(self) -> None:
        """After pass 1: locate each task's bin and the rank inside it."""
        for t, counts in enumerate(self.hi):
            k = rank_from_bottom(int(counts.sum()), self.density)
            if k <= 0:
                self.bin[t], self.rank[t] = -1, 0
                continue
            cum = np.cumsum(counts)
            b = int(np.searchsorted(cum, k))
            self.bin[t], self.rank[t] = b, k - (int(cum[b - 1]) if b else 0)

    def thresholds(self) -> np.ndarray:
        """After pass 2: the exact k-th value per task (0 where everything is kept)."""
        out = np.zeros(len(self.bin), dtype=np.float32)
        for t in range(len(self.bin)):
            if self.bin[t] < 0:
                continue
            low = int(np.searchsorted(np.cumsum(self.lo[t]), self.rank[t]))
            out[t] = np.array([(int(self.bin[t]) << 16) | low], dtype=np.uint32).view(np.float32)[0]
        return out
