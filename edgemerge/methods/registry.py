"""Merge methods: each is a combination of parts plus its name, paper and defaults.

``METHODS`` is the one registry (a literal dict). Adding a method = one entry here + its test.
A method maps the per-task vectors τ_t = θ_t − θ0 of one chunk to τ_MTL for that chunk:

    τ_MTL = scale · aggregate(elect(sparsify(τ_1 … τ_N)))

Consensus methods are a post-filter the merge pipeline applies after TALL masks exist
(``edgemerge.merge``): τ_MTL ← τ_MTL ⊙ [Σ_t m_t ≥ k].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, unknown_name
from ..fast import kernel
from .parts import AGGREGATE, SPARSIFY, Chunk, elect_sign

TOPK_SCOPES = ("global", "tensor")


@dataclass(frozen=True)
class ChunkResult:
    """τ_MTL for one chunk, plus what the pipeline needs to resolve TIES sign ties exactly.

    Where the elected sign is 0 but some trimmed entry is not, the reference code uses the global
    majority sign, which is only known after the whole model was seen. ``values`` holds the choice
    for a negative (or zero) majority; ``tie_index``/``tie_positive`` the alternative.
    """

    values: np.ndarray
    tie_index: np.ndarray
    tie_positive: np.ndarray
    n_pos: int = 0
    n_neg: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str
    sparsify: str
    elect: bool
    aggregate: str
    defaults: dict[str, Any] = field(default_factory=dict)
    consensus: bool = False

    def merge_chunk(self, taus: np.ndarray, chunk: Chunk, params: dict[str, Any]) -> ChunkResult:
        """τ_MTL (float32) of one chunk from the float32 stack ``taus[N, n]``."""
        agg = AGGREGATE[self.aggregate]
        scale = np.float32(params["scale"])
        fused = kernel("ties_merge") if self.elect else None
        if fused is not None and self.sparsify == "magnitude":  # the kernel trims too
            return self._merge_fused(fused, taus, None, chunk, scale)
        sparse = SPARSIFY[self.sparsify](taus, chunk, params)
        if not self.elect:
            return ChunkResult(agg(sparse, None) * scale, np.zeros(0, np.int64), np.zeros(0, np.float32))
        if fused is not None:
            return self._merge_fused(fused, taus, sparse, chunk, scale)
        sign = elect_sign(sparse)
        values = agg(sparse, sign > 0)
        ties = np.flatnonzero((sign == 0) & (sparse != 0).any(axis=0))
        tie_pos = agg(sparse[:, ties], np.ones(len(ties), dtype=bool)) * scale if len(ties) else np.zeros(0, np.float32)
        return ChunkResult(values * scale, ties, tie_pos, int((sign > 0).sum()), int((sign < 0).sum()))

    def _merge_fused(self, fused, taus, sparse, chunk: Chunk, scale: np.float32) -> ChunkResult:
        """The same trim/elect/aggregate in one compiled pass (``edgemerge.fast``)."""
        if self.sparsify == "magnitude":  # fuse the trim as well
            src, thr = taus, np.asarray(chunk.thresholds, dtype=np.float32)
        else:
            src, thr = sparse, np.zeros(len(taus), dtype=np.float32)
        n = src.shape[1]
        out, flag, pos = np.empty(n, np.float32), np.zeros(n, np.bool_), np.zeros(n, np.float32)
        n_pos, n_neg = fused(np.ascontiguousarray(src), thr, self.aggregate == "mean", out, flag, pos)
        ties = np.flatnonzero(flag)
        return ChunkResult(out * scale, ties, pos[ties] * scale, int(n_pos), int(n_neg))

    def resolve(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in and every value checked; ConfigError names the bad parameter."""
        given = dict(params or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ConfigError(f"method {self.name!r}: {unknown_name('parameter', unknown[0], list(self.defaults))}")
        out = {**self.defaults, **given}
        for key, value in out.items():
            _check_param(self.name, key, value)
        return out


def _check_param(method: str, key: str, value: Any) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"method {method!r}: parameter {key}={value!r} {why}")

    if key == "scale" and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise bad("must be a finite number")
    if key == "density" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise bad("must be in (0, 1]")
    if key in ("gamma", "drop_rate") and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise bad("must be in [0, 1)")
    if key in ("seed", "k") and not (isinstance(value, int) and value >= 0):
        raise bad("must be a non-negative integer")
    if key == "topk_scope" and value not in TOPK_SCOPES:
        raise bad(f"must be one of {', '.join(TOPK_SCOPES)}")


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(
        "task_arithmetic", "Task arithmetic: τ_MTL = λ Σ_t τ_t",
        "Ilharco et al. 2023, Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089",
        "none", False, "sum", {"scale": 1.0}),
    "ties": Method(
        "ties", "TIES: trim to top-k magnitude, elect sign by mass, disjoint mean, × λ",
        "Yadav et al. 2023, TIES-Merging, https://arxiv.org/abs/2306.01708",
        "magnitude", True, "mean", {"scale": 1.0, "density": 0.2, "topk_scope": "global"}),
    "breadcrumbs": Method(
        "breadcrumbs", "Model Breadcrumbs: per row drop top-γ outliers, keep largest β of the rest, sum, × λ",
        "Davari & Belilovsky 2024, Model Breadcrumbs, https://arxiv.org/abs/2312.06795",
        "breadcrumbs", False, "sum", {"scale": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": Method(
        "breadcrumbs_ties", "Breadcrumbs sparsification + TIES sign election, disjoint sum (mergekit's default, normalize=false)",
        "Davari & Belilovsky 2024 + Yadav et al. 2023 (as combined in mergekit)",
        "breadcrumbs", True, "sum", {"scale": 1.0, "density": 0.9, "gamma": 0.01}),
    "dare": Method(
        "dare", "DARE: drop with probability p, rescale by 1/(1−p), sum, × λ",
        "Yu et al. 2024, Language Models are Super Mario, https://arxiv.org/abs/2311.03099",
        "dare", False, "sum", {"scale": 1.0, "drop_rate": 0.9, "seed": 0}),
    "dare_ties": Method(
        "dare_ties", "DARE sparsification + TIES sign election, disjoint sum (mergekit's default, normalize=false)",
        "Yu et al. 2024 + Yadav et al. 2023 (as combined in mergekit)",
        "dare", True, "sum", {"scale": 1.0, "drop_rate": 0.9, "seed": 0}),
    "consensus_ta": Method(
        "consensus_ta", "Consensus over task arithmetic: keep entries active in ≥ k TALL masks",
        "Wang et al. 2024, Localizing Task Information (TALL masks / Consensus), https://arxiv.org/abs/2405.07813",
        "none", False, "sum", {"scale": 1.0, "k": 2}, consensus=True),
    "consensus_ties": Method(
        "consensus_ties", "Consensus over TIES (disjoint sum, as the reference code): keep entries active in ≥ k TALL masks",
        "Wang et al. 2024, https://arxiv.org/abs/2405.07813; reference code github.com/nik-dim/tall_masks",
        "magnitude", True, "sum", {"scale": 1.0, "density": 0.2, "topk_scope": "global", "k": 2}, consensus=True),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(unknown_name("merge method", name, list(METHODS))) from None
