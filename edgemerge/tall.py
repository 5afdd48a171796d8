"""TALL masks (Wang et al. 2024, https://arxiv.org/abs/2405.07813) and the choice of λ_t.

    m_t = |τ_t| > λ_t · |τ_MTL − τ_t|          (elementwise, float32)

For a grid λ_0 < … < λ_{G-1} one pass stores, per task and element, the bucket
``b = #{j : |τ_t| > λ_j·|τ_MTL − τ_t|}`` (uint8). Because λ·d rounds monotonically, the mask for
grid point j is exactly ``b > j`` -- the formula itself, not an approximation. Per bucket we also
sum |τ_t|² (the error where the mask is off: θ_t is rebuilt as θ0) and |τ_MTL − τ_t|² (the error
where it is on), so the reconstruction error ‖θ0 + m_t ⊙ τ_MTL − θ_t‖ of every grid point and the
mask density come out of the same pass.

Choosing λ_t: the paper picks it on each task's validation data (pass ``score`` to
``edgemerge.merge.merge``). Without data we pick the smallest reconstruction error -- *our*
default, not the paper's. Note what it implies: each element's error is smallest with the mask on
exactly when |τ_t| > |τ_MTL − τ_t|, i.e. at λ = 1, so over a grid below 1 this criterion picks the
largest λ (the sparsest mask). Use validation data where you have it.
"""

from __future__ import annotations

import numpy as np

from .fast import kernel

DEFAULT_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


def tall_mask(tau_t: np.ndarray, tau_mtl: np.ndarray, lam: float) -> np.ndarray:
    """The TALL mask for one λ, straight from the formula (reference for tests and small uses)."""
    t = tau_t.astype(np.float32, copy=False)
    return np.abs(t) > np.float32(lam) * np.abs(tau_mtl.astype(np.float32, copy=False) - t)


class TallStats:
    """Per-task bucket statistics over the whole model for one grid of λ values."""

    def __init__(self, lambdas: tuple[float, ...], n_tasks: int):
        self.lambdas = tuple(float(x) for x in lambdas)
        self._lam32 = [np.float32(x) for x in self.lambdas]
        g = len(self.lambdas) + 1
        self.off_sq = np.zeros((n_tasks, g))   # Σ |τ_t|² per bucket
        self.on_sq = np.zeros((n_tasks, g))    # Σ |τ_MTL − τ_t|² per bucket
        self.count = np.zeros((n_tasks, g), dtype=np.int64)
        self.tau_sq = np.zeros(n_tasks)

    def buckets(self, tau_t: np.ndarray, tau_mtl: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket uint8, |τ_t|, |τ_MTL − τ_t|) for one chunk of one task."""
        a = np.abs(tau_t)
        d = np.abs(tau_mtl - tau_t)
        b = np.zeros(a.shape, dtype=np.uint8)
        for lam in self._lam32:
            b += a > lam * d
        return b, a, d

    def update(self, task: int, tau_t: np.ndarray, tau_mtl: np.ndarray) -> np.ndarray:
        """Add one chunk; returns its buckets."""
        fused = kernel("tall_update")
        if fused is not None:
            b = np.empty(tau_t.shape, dtype=np.uint8)
            self.tau_sq[task] += fused(tau_t, tau_mtl, np.array(self._lam32, np.float32), b,
                                       self.off_sq[task], self.on_sq[task], self.count[task])
            return b
        b, a, d = self.buckets(tau_t, tau_mtl)
        self._add(task, b, a, d, +1)
        return b

    def _add(self, task: int, b: np.ndarray, a: np.ndarray, d: np.ndarray, sign: int) -> None:
        g = len(self.lambdas) + 1
        a64, d64 = a.astype(np.float64), d.astype(np.float64)
        self.off_sq[task] += sign * np.bincount(b, weights=a64 * a64, minlength=g)
        self.on_sq[task] += sign * np.bincount(b, weights=d64 * d64, minlength=g)
        self.count[task] += sign * np.bincount(b, minlength=g)
        self.tau_sq[task] += sign * float(np.dot(a64, a64))

    def replace(self, task: int, tau_t: np.ndarray, old_mtl: np.ndarray, new_mtl: np.ndarray) -> np.ndarray:
        """Swap a few elements' contribution from ``old_mtl`` to ``new_mtl``; returns new buckets."""
        self._add(task, *self.buckets(tau_t, old_mtl), -1)
        return self.update(task, tau_t, new_mtl)

    def errors(self, task: int) -> np.ndarray:
        """‖θ0 + m_t(λ_j) ⊙ τ_MTL − θ_t‖₂ for every grid point j."""
        off = np.cumsum(self.off_sq[task])[:-1]          # buckets 0..j are off at λ_j
        on = self.on_sq[task].sum() - np.cumsum(self.on_sq[task])[:-1]
        return np.sqrt(np.maximum(off + on, 0.0))

    def densities(self, task: int) -> np.ndarray:
        total = max(int(self.count[task].sum()), 1)
        return (total - np.cumsum(self.count[task])[:-1]) / total

    def tau_norm(self, task: int) -> float:
        return float(np.sqrt(self.tau_sq[task]))

    def best_by_error(self, task: int) -> int:
        """Grid index with the smallest reconstruction error (the first of equals)."""
        return int(np.argmin(self.errors(task)))
