"""The streaming merge: N task checkpoints + θ0 -> one bundle, one chunk of one tensor at a time.

Passes over the inputs (each reads θ0 and every task once, chunk by chunk):

1. TIES with a global top-k only: two histogram passes give each task's exact k-th largest |τ|
   (``edgemerge.topk``). The first pass of any method also checks every value is finite.
2. Merge: τ_MTL per chunk, written to a scratch file; with TALL masks the same pass computes each
   task's mask bucket (``edgemerge.tall``) and the reconstruction error of every λ.
3. Consensus methods only: keep entries active in ≥ k TALL masks (always built for the vote),
   then, with ``masks="tall"``, rebuild the masks against the filtered vector (one more pass).
4. Write the bundle from θ0, the scratch vector and the buckets of the chosen λ_t. A float param
   whose τ_MTL came out zero everywhere (no task changed it) is stored as θ0 alone (carried).

Peak memory is O(N × chunk), not O(N × model); scratch files live next to the output and are
removed afterwards. Nothing is written under the output name unless everything succeeded.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from .bundle import write_bundle
from .checkpoints import (
    STAT_POLICIES, STATISTICS, VARIANCES, Checkpoint, Plan, matches, nonfinite_problem, open_checkpoint, plan_merge,
    pread_elements,
)
from .errors import CheckpointError, ConfigError, finite_score
from .io import Lazy, check_writable, refuse_inputs, remove_stale
from .methods import Method, get_method
from .methods.parts import Chunk
from .runtime.bits import pack_bits, packed_nbytes
from .runtime.bundle import check_task_name
from .runtime.dtypes import DTYPES, FLOAT_DTYPES, VECTOR_DTYPES
from .tall import DEFAULT_LAMBDAS, TallStats
from .topk import KthMagnitude, kth_largest_magnitude

MASK_POLICIES = ("tall", "none")
Progress = Callable[[str, int, int], None]          # (stage, done, total)
Score = Callable[[str, float, dict[str, np.ndarray]], float]   # (task, λ, weights) -> higher is better


@dataclass
class MergeConfig:
    """Everything ``merge`` needs; ``validate`` checks it once, before any file is opened."""

    base: str
    tasks: dict[str, str]                          # task name -> checkpoint path, in bundle order
    method: str = "ties"
    params: dict[str, Any] = field(default_factory=dict)
    masks: str = "tall"
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    private: tuple[str, ...] = ()
    statistics: str = "per-task"                   # running statistics: kept per task, or merged
    ties: dict[str, str] = field(default_factory=dict)  # alias -> kept key, for files holding both copies
    vector_dtype: str = "auto"                     # τ_MTL storage: θ0's float dtype (of most elements)
    chunk_elems: int = 1 << 20

    def validate(self) -> tuple[Method, dict[str, Any]]:
        if not self.tasks:
            raise ConfigError("no tasks given: pass at least one --task NAME=PATH")
        for name in self.tasks:
            check_task_name(name)
        method = get_method(self.method)
        params = method.resolve(self.params)
        if self.masks not in MASK_POLICIES:
            raise ConfigError(f"mask policy {self.masks!r} is not one of {', '.join(MASK_POLICIES)}")
        lams = tuple(float(x) for x in self.lambdas)
        if not lams or len(lams) > 254 or any(not (math.isfinite(x) and x >= 0) for x in lams) or list(lams) != sorted(set(lams)):
            raise ConfigError(f"TALL λ grid {self.lambdas!r} must be 1-254 distinct, increasing, non-negative numbers")
        if self.vector_dtype not in ("auto", *VECTOR_DTYPES):
            raise ConfigError(f"vector dtype {self.vector_dtype!r} is not one of auto, {', '.join(VECTOR_DTYPES)}")
        if self.statistics not in STAT_POLICIES:
            raise ConfigError(f"statistics policy {self.statistics!r} is not one of {', '.join(STAT_POLICIES)}")
        if self.chunk_elems < 1024:
            raise ConfigError("chunk_elems must be at least 1024")
        return method, params


@dataclass
class TaskReport:
    name: str
    lam: float | None
    density: float
    error: float                 # ‖θ0 + m_t ⊙ τ_MTL − θ_t‖₂ at the chosen λ
    relative_error: float        # error / ‖τ_t‖₂
    errors: list[float] = field(default_factory=list)      # per grid λ
    scores: list[float] | None = None                       # per grid λ, when a score was given


@dataclass
class MergeReport:
    path: str
    method: str
    params: dict[str, Any]
    tasks: list[TaskReport]
    seconds: float
    bundle_bytes: int
    input_bytes: int
    n_params: int                # elements merged (vector + masks in the bundle)
    n_unchanged: int = 0         # elements of float params no task changed: carried as θ0


# -- scratch files ------------------------------------------------------------------------------


class Scratch:
    """τ_MTL (float32) and per-task buckets (uint8) for all merged params, in flat files."""

    def __init__(self, directory: str, plan: Plan, base: Checkpoint, n_tasks: int, with_buckets: bool):
        self.offset: dict[str, int] = {}
        total = 0
        for p in plan.merged:
            self.offset[p] = total
            total += base.info(p).numel
        self.total = total
        self._vec = open(os.path.join(directory, "vector.f32"), "w+b")
        self._buckets = [open(os.path.join(directory, f"bucket{i}.u8"), "w+b") for i in range(n_tasks if with_buckets else 0)]

    def write_vector(self, p: str, start: int, values: np.ndarray) -> None:
        _pwrite(self._vec, (self.offset[p] + start) * 4, values.astype(np.float32, copy=False))

    def read_vector(self, p: str, start: int, stop: int) -> np.ndarray:
        return _pread(self._vec, (self.offset[p] + start) * 4, stop - start, np.float32)

    def write_bucket(self, task: int, p: str, start: int, b: np.ndarray) -> None:
        _pwrite(self._buckets[task], self.offset[p] + start, b)

    def read_bucket(self, task: int, p: str, start: int, stop: int) -> np.ndarray:
        return _pread(self._buckets[task], self.offset[p] + start, stop - start, np.uint8)

    def close(self) -> None:
        for f in [self._vec, *self._buckets]:
            f.close()


def _pwrite(f, offset: int, arr: np.ndarray) -> None:
    view = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    while len(view):
        n = os.pwrite(f.fileno(), view, offset)
        view, offset = view[n:], offset + n


def _pread(f, offset: int, count: int, dtype) -> np.ndarray:
    return pread_elements(f, f.name, "(scratch)", np.dtype(dtype), offset, 0, count)


# -- chunking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    param: str
    start: int
    stop: int
    row_len: int


def units(plan: Plan, base: Checkpoint, chunk_elems: int, whole_rows: bool) -> list[Unit]:
    """Flat slices of every merged param; whole rows when the method works per row."""
    out = []
    for p in plan.merged:
        info = base.info(p)
        n = info.numel
        row = math.prod(info.shape[1:]) if len(info.shape) >= 2 else n
        step = max(1, chunk_elems // row) * row if whole_rows and row else chunk_elems
        out.extend(Unit(p, s, min(n, s + step), row or 1) for s in range(0, n, max(step, 1)))
        if n == 0:
            out.append(Unit(p, 0, 0, 1))
    return out


class Inputs:
    """θ0 and the tasks, read chunk by chunk as float32, with NaN/Inf bookkeeping."""

    def __init__(self, base: Checkpoint, tasks: dict[str, Checkpoint]):
        self.base, self.tasks = base, tasks
        self.ckpts = list(tasks.values())
        self.problems: dict[tuple[str, str], str] = {}
        self.checking = True

    def taus(self, u: Unit) -> tuple[np.ndarray, np.ndarray]:
        """(θ0 chunk, τ stack[N, n]) in float32."""
        raw0 = self.base.read(u.param, u.start, u.stop)
        self._check(self.base, u.param, raw0)
        taus = np.empty((len(self.ckpts), u.stop - u.start), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by name
            b = raw0.astype(np.float32)
            for i, c in enumerate(self.ckpts):
                raw = c.read(u.param, u.start, u.stop)
                self._check(c, u.param, raw)
                np.subtract(raw.astype(np.float32, copy=False), b, out=taus[i])
                if self.checking and (c.path, u.param) not in self.problems and not np.isfinite(taus[i]).all():
                    if nonfinite_problem(c.path, u.param, raw) is None and nonfinite_problem(self.base.path, u.param, raw0) is None:
                        self.problems[(c.path, u.param)] = (
                            f"{c.path}: {u.param!r}: τ = θ_t − θ0 is outside the float32 range edgemerge merges in "
                            f"(|θ| up to {float(np.max(np.abs(raw.astype(np.float64)))):.3g})")
        return b, taus

    def _check(self, c: Checkpoint, key: str, raw: np.ndarray) -> None:
        if self.checking and (c.path, key) not in self.problems:
            msg = nonfinite_problem(c.path, key, raw)
            if msg:
                self.problems[(c.path, key)] = msg

    def finish_check(self) -> None:
        """After the first full pass: raise with every non-finite tensor, or stop checking."""
        self.checking = False
        if self.problems:
            msgs = sorted(self.problems.values())
            raise CheckpointError(f"{len(msgs)} tensor(s) hold NaN/Inf or overflow float32:\n  " + "\n  ".join(msgs))


# -- the merge ----------------------------------------------------------------------------------


def _stage(progress: Progress | None, stage: str, items: list[Unit]) -> Iterator[Unit]:
    for i, u in enumerate(items):
        yield u
        if progress:
            progress(stage, i + 1, len(items))


def _round_to(values: np.ndarray, vector_dtype: str) -> np.ndarray:
    """τ_MTL as the bundle will store it, back in float32 (masks are built on stored values)."""
    if vector_dtype == "F32":
        return values
    return values.astype(DTYPES[vector_dtype]).astype(np.float32)


def merge(
    config: MergeConfig,
    output: str | os.PathLike,
    *,
    score: Score | None = None,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge ``config.tasks`` into a bundle at ``output``; return what was chosen and measured.

    ``score(task, λ, weights)`` (optional) rates θ_t rebuilt with TALL λ on the task's own
    validation data (higher is better); without it λ_t is picked by reconstruction error.
    """
    method, params = config.validate()
    output = os.fspath(output)
    refuse_inputs(output, [config.base, *config.tasks.values()])
    check_writable(output)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        base = open_checkpoint(config.base)
        stack.callback(base.close)
        tasks: dict[str, Checkpoint] = {}
        for name, path in config.tasks.items():
            tasks[name] = open_checkpoint(path)
            stack.callback(tasks[name].close)
        try:
            plan = plan_merge(base, tasks, config.private, STATISTICS if config.statistics == "per-task" else (), config.ties)
        except CheckpointError as exc:  # every problem at once: NaN/Inf too, not only after keys are fixed
            raise _with_nonfinite(exc, [base, *tasks.values()]) from None
        plan = carry_unchanged_statistics(plan, base, tasks)
        vector_dtype = config.vector_dtype if config.vector_dtype != "auto" else auto_vector_dtype(plan, base)
        config = replace(config, vector_dtype=vector_dtype)
        hasher = stack.enter_context(ThreadPoolExecutor(1))  # hashing overlaps the passes (2nd core)
        hashes = {n: hasher.submit(c.sha256) for n, c in [("__base__", base), *tasks.items()]}
        out_dir = os.path.dirname(os.path.abspath(output))
        remove_stale(out_dir, ".edgemerge-")  # scratch of merges that were killed (named by their pid)
        scratch_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f".edgemerge-{os.getpid()}-", dir=out_dir))
        tall = config.masks == "tall" or method.consensus  # consensus votes with TALL masks
        scratch = Scratch(scratch_dir, plan, base, len(tasks), tall)
        stack.callback(scratch.close)
        inputs = Inputs(base, tasks)
        work = units(plan, base, config.chunk_elems, method.sparsify == "breadcrumbs")
        thresholds = _global_thresholds(method, params, inputs, work, progress)
        stats = TallStats(config.lambdas, len(tasks)) if tall else None
        _merge_pass(method, params, config, inputs, work, scratch, stats, thresholds, progress)
        choice, scores = _choose(config, stats, scratch, inputs, plan, score) if tall else (None, {})
        if method.consensus:
            _consensus_pass(params["k"], inputs, work, scratch, choice, progress)
            if config.masks == "tall":  # the bundle's own masks, against the filtered vector
                stats = TallStats(config.lambdas, len(tasks))
                _tall_pass(inputs, work, scratch, stats, progress)
                choice, scores = _choose(config, stats, scratch, inputs, plan, score)
            else:
                stats, choice, scores = None, None, {}
        sources = {n: f.result() for n, f in hashes.items()}
        reports = _task_reports(config, stats, choice, scores)
        unchanged = _unchanged(plan, base, scratch, config.chunk_elems)
        if unchanged and choice is not None:
            _kept_densities(reports, stats, choice, unchanged, base, scratch, config.chunk_elems)
        stored = Plan([p for p in plan.merged if p not in unchanged], sorted([*plan.carried, *unchanged]), plan.private,
                      plan.statistics, plan.aliases)
        check_rebuilt(stored, base, scratch, choice, list(config.tasks), config.chunk_elems)
        _write(output, config, method, params, stored, inputs, scratch, choice, reports, sources, progress)
    return MergeReport(
        output, method.name, params, reports, time.perf_counter() - t0, os.path.getsize(output),
        sum(_source_bytes(p) for p in [config.base, *config.tasks.values()]),
        sum(base.info(p).numel for p in stored.merged), sum(base.info(p).numel for p in unchanged),
    )


def _unchanged(plan: Plan, base: Checkpoint, scratch: Scratch, chunk: int) -> set[str]:
    """Merged params whose τ_MTL is zero everywhere (frozen during fine-tuning, or emptied by the
    method): θ_t = θ0 for every task whatever the mask, so the bundle carries them as θ0 alone,
    with no vector and no mask bits, and a switch never touches them."""
    out = set()
    for p in plan.merged:
        n = base.info(p).numel
        if not any(scratch.read_vector(p, s, min(n, s + chunk)).any() for s in range(0, n, chunk)):
            out.add(p)
    return out


def _kept_densities(reports: list[TaskReport], stats: TallStats, choice: list[int], unchanged: set[str],
                    base: Checkpoint, scratch: Scratch, chunk: int) -> None:
    """Mask densities over the params the bundle keeps masks for (a carried param keeps none)."""
    for i, r in enumerate(reports):
        count = stats.count[i].copy()  # elements per bucket; bucket > j means "on" at grid point j
        for p in unchanged:
            n = base.info(p).numel
            for s in range(0, n, chunk):
                count -= np.bincount(scratch.read_bucket(i, p, s, min(n, s + chunk)), minlength=len(count))
        total = int(count.sum())
        r.density = float(count[choice[i] + 1:].sum() / total) if total else 0.0


def _with_nonfinite(exc: CheckpointError, ckpts: list[Checkpoint]) -> CheckpointError:
    """``exc`` with the NaN/Inf tensors of ``ckpts`` added (read one tensor at a time)."""
    found = [msg for c in ckpts for k in c.keys() if c.info(k).dtype in FLOAT_DTYPES
             for msg in [nonfinite_problem(c.path, k, c.read(k))] if msg]
    if not found:
        return exc
    head, _, rest = str(exc).partition(":\n  ")
    lines = [*rest.split("\n  "), *found] if rest else [str(exc), *found]
    return CheckpointError(f"{len(lines)} problem(s) with the task checkpoints:\n  " + "\n  ".join(lines))


def carry_unchanged_statistics(plan: Plan, base: Checkpoint, tasks: dict[str, Checkpoint]) -> Plan:
    """Running statistics no task changed (frozen BatchNorm: byte-identical in θ0 and every task)
    are carried -- stored once, never rewritten by a switch or refit -- like unchanged weights."""
    same = [k for k in plan.statistics if k in base.keys() and all(
        k in c.keys() and c.info(k) == base.info(k) and c.read(k).tobytes() == base.read(k).tobytes() for c in tasks.values())]
    if not same:
        return plan
    private = {t: [k for k in keys if k not in same] for t, keys in plan.private.items()}
    return replace(plan, carried=sorted([*plan.carried, *same]), private=private,
                   statistics=[k for k in plan.statistics if k not in same])


def auto_vector_dtype(plan: Plan, base: Checkpoint) -> str:
    """τ_MTL in θ0's float dtype: that of most merged elements (a bf16 model with a float32 rotary
    buffer is a bf16 model); F64 is stored as F32."""
    counts: dict[str, int] = {}
    for p in plan.merged:
        counts[base.info(p).dtype] = counts.get(base.info(p).dtype, 0) + base.info(p).numel
    top = max(counts, key=lambda d: (counts[d], d)) if counts else "F32"
    return top if top in ("F16", "BF16") else "F32"


def check_rebuilt(plan: Plan, base: Checkpoint, scratch: Scratch, choice: list[int] | None, tasks: list[str],
                  chunk: int) -> None:
    """Refuse, before anything is written, a bundle that would rebuild an invalid θ_t for a task:
    a non-finite value (θ0 + τ_MTL overflowing θ0's dtype) or a variance ≤ 0 (merged statistics).
    Every task's θ_t holds θ0 or θ0 + τ_MTL per element, so one pass over θ0 and τ_MTL suffices."""
    problems: dict[tuple[str, str], list] = {}
    for p in plan.merged:
        info = base.info(p)
        is_var = matches(p, VARIANCES)
        for s in range(0, info.numel, chunk):
            e = min(info.numel, s + chunk)
            with np.errstate(over="ignore", invalid="ignore"):
                rebuilt = (base.read(p, s, e).astype(np.float32) + scratch.read_vector(p, s, e)).astype(DTYPES[info.dtype])
                rebuilt = rebuilt.astype(np.float32)
            bad = ~np.isfinite(rebuilt) | ((rebuilt <= 0) if is_var else False)
            if not bad.any():
                continue
            for i, t in enumerate(tasks):
                on = bad if choice is None else bad & (scratch.read_bucket(i, p, s, e) > choice[i])
                if on.any():
                    entry = problems.setdefault((t, p), [0, np.inf])
                    entry[0] += int(on.sum())
                    entry[1] = min(entry[1], float(np.nanmin(np.where(on, rebuilt, np.inf))))
    if problems:
        lines = [f"task {t!r}, {p!r}: {n} rebuilt value(s) {'≤ 0 for a variance' if matches(p, VARIANCES) else 'not finite'}"
                 f" (smallest {m:.4g})" for (t, p), (n, m) in sorted(problems.items())]
        raise CheckpointError(
            f"{len(lines)} task weight(s) would be invalid; nothing was written. Running statistics are not task vectors: "
            "keep them per task (statistics='per-task', the default; CLI --statistics per-task), or lower the method's "
            "scale (--param scale=...):\n  " + "\n  ".join(lines))


def _source_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def _global_thresholds(method, params, inputs: Inputs, work, progress) -> np.ndarray | None:
    """Exact per-task k-th largest |τ| over all merged params (two histogram passes)."""
    if method.sparsify != "magnitude" or params["topk_scope"] != "global":
        return None
    kth = KthMagnitude(len(inputs.ckpts), params["density"])
    for stage in (1, 2):
        for u in _stage(progress, f"top-k pass {stage}/2", work):
            _, taus = inputs.taus(u)
            for i in range(len(taus)):
                kth.add(stage, i, taus[i])
        if stage == 1:
            inputs.finish_check()
            kth.refine()
    return kth.thresholds()


def _tensor_thresholds(inputs: Inputs, u: Unit, density: float) -> np.ndarray:
    """Per-tensor top-k (option): each task's k-th largest |τ| within this tensor."""
    info = inputs.base.info(u.param)
    full = Unit(u.param, 0, info.numel, u.row_len)
    _, taus = inputs.taus(full)
    return np.array([kth_largest_magnitude(t, density) for t in taus], dtype=np.float32)


def _merge_pass(method, params, config, inputs: Inputs, work, scratch: Scratch, stats, thresholds, progress) -> None:
    task_ids = tuple(range(len(inputs.ckpts)))
    # DARE's drops are keyed by the task's name, so listing the tasks in another order changes nothing
    task_keys = tuple(zlib.crc32(name.encode("utf-8")) for name in inputs.tasks)
    ties: list[tuple[Unit, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    n_pos = n_neg = 0
    per_tensor = method.sparsify == "magnitude" and params["topk_scope"] == "tensor"
    current, thr = None, thresholds
    for u in _stage(progress, "merge", work):
        if per_tensor and u.param != current:
            current, thr = u.param, _tensor_thresholds(inputs, u, params["density"])
        _, taus = inputs.taus(u)
        chunk = Chunk(u.param, u.start, u.row_len, thr, params.get("seed", 0), task_keys, len(inputs.base.info(u.param).shape))
        res = method.merge_chunk(taus, chunk, params)
        vec = _round_to(res.values, config.vector_dtype)
        n_pos, n_neg = n_pos + res.n_pos, n_neg + res.n_neg
        if len(res.tie_index):
            alt = _round_to(res.tie_positive, config.vector_dtype)
            ties.append((u, res.tie_index, vec[res.tie_index].copy(), alt, taus[:, res.tie_index].copy()))
        scratch.write_vector(u.param, u.start, vec)
        if stats is not None:
            for i in task_ids:
                scratch.write_bucket(i, u.param, u.start, stats.update(i, taus[i], vec))
    if inputs.checking:
        inputs.finish_check()
    if n_pos > n_neg:  # the reference's majority sign is positive: flip the provisional choices
        for u, idx, old, new, tau_at in ties:
            _write_points(scratch, u, idx, new)
            if stats is not None:
                for i in task_ids:
                    b = stats.replace(i, tau_at[i], old, new)
                    for j, pos in enumerate(idx):
                        scratch.write_bucket(i, u.param, u.start + int(pos), b[j : j + 1])


def _write_points(scratch: Scratch, u: Unit, idx: np.ndarray, values: np.ndarray) -> None:
    for j, pos in enumerate(idx):
        scratch.write_vector(u.param, u.start + int(pos), values[j : j + 1])


def _tall_pass(inputs: Inputs, work, scratch: Scratch, stats: TallStats, progress) -> None:
    for u in _stage(progress, "TALL masks", work):
        _, taus = inputs.taus(u)
        vec = scratch.read_vector(u.param, u.start, u.stop)
        for i in range(len(taus)):
            scratch.write_bucket(i, u.param, u.start, stats.update(i, taus[i], vec))


def _consensus_pass(k: int, inputs: Inputs, work, scratch: Scratch, choice, progress) -> None:
    """τ_MTL ← τ_MTL ⊙ [#tasks whose TALL mask is on ≥ k] (Wang et al. 2024, Consensus)."""
    for u in _stage(progress, "consensus", work):
        votes = np.zeros(u.stop - u.start, dtype=np.int32)
        for i in range(len(inputs.ckpts)):
            votes += scratch.read_bucket(i, u.param, u.start, u.stop) > choice[i]
        vec = scratch.read_vector(u.param, u.start, u.stop)
        scratch.write_vector(u.param, u.start, np.where(votes >= k, vec, np.float32(0)))


def _weights_at(inputs: Inputs, plan: Plan, scratch: Scratch, task: int, j: int, name: str) -> dict[str, np.ndarray]:
    """θ_t rebuilt with grid point j (for the validation score)."""
    out: dict[str, np.ndarray] = {}
    for p in plan.merged:
        info = inputs.base.info(p)
        b = inputs.base.read(p)
        vec = scratch.read_vector(p, 0, info.numel).reshape(info.shape)
        m = (scratch.read_bucket(task, p, 0, info.numel) > j).reshape(info.shape)
        b32 = b.astype(np.float32)
        out[p] = np.where(m, b32 + vec, b32).astype(b.dtype)
    for p in plan.carried:
        out[p] = inputs.base.read(p)
    for k in plan.private.get(name, []):
        out[k] = inputs.tasks[name].read(k)
    return out


def _choose(config: MergeConfig, stats: TallStats, scratch, inputs: Inputs, plan: Plan, score) -> tuple[list[int], dict[str, list[float]]]:
    """Grid index per task: best validation score if ``score`` is given, else least error."""
    choice: list[int] = []
    scores: dict[str, list[float]] = {}
    for i, name in enumerate(config.tasks):
        if score is None:
            choice.append(stats.best_by_error(i))
            continue
        vals = []
        for j, lam in enumerate(config.lambdas):
            vals.append(finite_score(score(name, lam, _weights_at(inputs, plan, scratch, i, j, name)), f"task {name!r} at λ={lam}"))
        scores[name] = vals
        choice.append(int(np.argmax(vals)))
    return choice, scores


def _task_reports(config: MergeConfig, stats: TallStats | None, choice, scores) -> list[TaskReport]:
    out = []
    for i, name in enumerate(config.tasks):
        if stats is None:
            out.append(TaskReport(name, None, 1.0, float("nan"), float("nan")))
            continue
        j, errs = choice[i], stats.errors(i)
        norm = stats.tau_norm(i)
        out.append(TaskReport(
            name, config.lambdas[j], float(stats.densities(i)[j]), float(errs[j]),
            float(errs[j] / norm) if norm > 0 else 0.0, [float(e) for e in errs], scores.get(name),
        ))
    return out


def _write(output, config, method, params, plan, inputs: Inputs, scratch, choice, reports, sources, progress) -> None:
    base, tasks = inputs.base, inputs.tasks
    vdt = DTYPES[config.vector_dtype]

    def base_t(p):
        info = base.info(p)
        return Lazy(info.dtype, info.shape, lambda: base.read(p))

    def vector_t(p):
        info = base.info(p)
        return Lazy(config.vector_dtype, info.shape,
                    lambda: scratch.read_vector(p, 0, info.numel).astype(vdt).reshape(info.shape))

    def mask_t(i, p):
        n = base.info(p).numel
        return Lazy("U8", (packed_nbytes(n),), lambda: pack_bits(scratch.read_bucket(i, p, 0, n) > choice[i]))

    def private_t(c, k):
        info = c.info(k)
        return Lazy(info.dtype, info.shape, lambda: c.read(k))

    names = list(config.tasks)
    masks = None if choice is None else {t: {p: mask_t(i, p) for p in plan.merged} for i, t in enumerate(names)}
    task_entries = {
        r.name: {
            "lambda": r.lam, "density": r.density, "recon_error": r.error if math.isfinite(r.error) else None,
            "source": {"file": os.path.basename(os.path.normpath(config.tasks[r.name])), "sha256": sources[r.name]},
        }
        for r in reports
    }
    total = len(plan.merged) * (2 + (len(names) if masks else 0)) + len(plan.carried) + sum(map(len, plan.private.values()))
    done = [0]

    def step(name: str, nbytes: int) -> None:
        done[0] += 1
        if progress:
            progress("write bundle", done[0], total)

    write_bundle(
        output,
        tasks=task_entries,
        base={p: base_t(p) for p in plan.merged + plan.carried},
        vector={p: vector_t(p) for p in plan.merged},
        masks=masks,
        private={t: {k: private_t(tasks[t], k) for k in plan.private.get(t, [])} for t in names},
        vector_dtype=config.vector_dtype,
        aliases=plan.aliases,
        method={"name": method.name, "params": params, "paper": method.paper},
        mask_info={"lambda_grid": list(config.lambdas), "selection": "none" if choice is None else ("validation" if any(r.scores for r in reports) else "reconstruction")},
        extra={"base": {"file": os.path.basename(os.path.normpath(config.base)), "sha256": sources["__base__"]},
               "options": {"private_patterns": list(config.private),
                           "statistics": {"policy": config.statistics, "per_task": plan.statistics}}},
        progress=step,
    )
