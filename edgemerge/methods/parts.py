"""The orthogonal parts merge methods are built from: sparsify × elect sign × aggregate.

Every part is a pure function over a float32 stack ``taus[N, n]`` (N tasks, n elements of one
chunk of one tensor) and never writes into its inputs. Chunks are slices of the flattened tensor;
every part is elementwise except breadcrumbs, whose chunks always hold whole rows.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class Chunk:
    """Where a chunk sits, and what the parts need to know about it."""

    name: str                     # parameter name
    start: int                    # flat offset of the chunk in the parameter
    row_len: int                  # elements per row (the whole tensor for 1-D params)
    thresholds: np.ndarray | None = None  # per-task magnitude thresholds (TIES trim)
    seed: int = 0
    task_ids: tuple[int, ...] = field(default_factory=tuple)   # DARE keys: a stable id per task
    ndim: int = 1                                              # of the parameter (0-d ones are kept whole)


# -- sparsify ------------------------------------------------------------------------------------


def sparsify_none(taus: np.ndarray, chunk: Chunk, params: dict) -> np.ndarray:
    return taus


def sparsify_magnitude(taus: np.ndarray, chunk: Chunk, params: dict) -> np.ndarray:
    """TIES trim: keep |τ| >= the task's k-th largest magnitude (ties at the threshold kept)."""
    thr = np.asarray(chunk.thresholds, dtype=np.float32)[:, None]
    return np.where(np.abs(taus) >= thr, taus, np.float32(0))


def breadcrumbs_counts(row_len: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, n_keep) for one row of d: drop the ``floor(γ·d)`` largest, keep the next
    ``floor(β·d)`` (at most what is left), as the authors' code and mergekit count."""
    n_top = int(gamma * row_len)
    return n_top, min(int(density * row_len), row_len - n_top)


def sparsify_breadcrumbs(taus: np.ndarray, chunk: Chunk, params: dict) -> np.ndarray:
    """Model Breadcrumbs, per row: drop the top γ outliers, keep the largest β of the rest, zero the tail.

    Ranks are by magnitude, largest first; equal magnitudes are ranked by position (stable sort).
    """
    if chunk.ndim == 0:  # a scalar has no row to rank in: the authors keep it
        return taus
    n, d = taus.shape[1], chunk.row_len
    n_top, n_keep = breadcrumbs_counts(d, params["density"], params["gamma"])
    rows = taus.reshape(taus.shape[0], n // d, d)
    order = np.argsort(-np.abs(rows), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(d)[None, None, :], axis=-1)
    keep = (ranks >= n_top) & (ranks < n_top + n_keep)
    return np.where(keep, rows, np.float32(0)).reshape(taus.shape)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def dare_key(seed: int, task_id: int, name: str) -> np.uint64:
    """Per (seed, task, tensor) key; independent of processing order and chunking."""
    k = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    k = _splitmix64(k ^ np.uint64(task_id))
    return _splitmix64(k ^ np.uint64(zlib.crc32(name.encode())))[0]


def dare_uniform(key: np.uint64, start: int, n: int) -> np.ndarray:
    """Uniform [0, 1) numbers for flat elements start..start+n: splitmix64(key ^ index) >> 11 / 2**53."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    return (_splitmix64(idx ^ key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sparsify_dare(taus: np.ndarray, chunk: Chunk, params: dict) -> np.ndarray:
    """DARE: drop each entry with probability p, rescale the survivors by 1/(1 - p)."""
    p = params["drop_rate"]
    out = np.empty_like(taus)
    for i, tid in enumerate(chunk.task_ids):
        u = dare_uniform(dare_key(chunk.seed, tid, chunk.name), chunk.start, taus.shape[1])
        out[i] = np.where(u >= p, taus[i] / np.float32(1.0 - p), np.float32(0))
    return out


SPARSIFY = {
    "none": sparsify_none,
    "magnitude": sparsify_magnitude,
    "breadcrumbs": sparsify_breadcrumbs,
    "dare": sparsify_dare,
}


# -- elect sign and aggregate --------------------------------------------------------------------


def elect_sign(taus: np.ndarray) -> np.ndarray:
    """TIES sign election by total mass: sign(Σ_t τ_t), 0 where the sum is exactly 0."""
    return np.sign(taus.sum(axis=0, dtype=np.float32))


def _disjoint(taus: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Entries that agree with the elected sign (``positive`` True: τ > 0, else τ < 0), others 0."""
    keep = np.where(positive, taus > 0, taus < 0)
    return np.where(keep, taus, np.float32(0))


def aggregate_sum(taus: np.ndarray, positive: np.ndarray | None) -> np.ndarray:
    if positive is None:
        return taus.sum(axis=0, dtype=np.float32)
    return _disjoint(taus, positive).sum(axis=0, dtype=np.float32)


def aggregate_mean(taus: np.ndarray, positive: np.ndarray | None) -> np.ndarray:
    """Disjoint mean: sum of the selected entries / max(number of non-zero selected entries, 1)."""
    sel = taus if positive is None else _disjoint(taus, positive)
    count = np.maximum((sel != 0).sum(axis=0), 1).astype(np.float32)
    return sel.sum(axis=0, dtype=np.float32) / count


AGGREGATE = {"sum": aggregate_sum, "mean": aggregate_mean}
