"""Measurements behind ``edgemerge bench`` and ``bench/switch_bench.py``: switch, inference, storage."""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Mapping

import numpy as np

from .runtime.bundle import Bundle


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls, after one warm-up call."""
    fn()
    return min(timed(fn, repeat))


def memcpy_seconds(bundle: Bundle, repeat: int = 5) -> list[float]:
    """A plain copy of every merged weight into preallocated buffers (the floor to compare with)."""
    srcs = [np.asarray(bundle.base(p.name)) for p in bundle.params if p.role == "merged"]
    dsts = [np.empty_like(s) for s in srcs]

    def copy() -> None:
        for s, d in zip(srcs, dsts):
            np.copyto(d, s)

    copy()
    return timed(copy, repeat)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_session(session, inputs: Mapping[str, np.ndarray] | np.ndarray, rounds: int = 3, runs: int = 5) -> dict[str, Any]:
    """Switch through every task ``rounds`` times; time each switch and ``runs`` inferences after it."""
    switches, infers = [], []
    session.run(inputs, task=session.tasks[0])  # warm up the session and the kernel
    for _ in range(rounds):
        for task in session.tasks:
            switches.append(session.switch(task))
            infers += timed(lambda: session.run(inputs), runs)
    return {
        "switch_p50_ms": 1e3 * percentile(switches, 50), "switch_p95_ms": 1e3 * percentile(switches, 95),
        "infer_p50_ms": 1e3 * percentile(infers, 50), "infer_p95_ms": 1e3 * percentile(infers, 95),
        "switches": len(switches), "runs": len(infers),
    }


def storage(bundle: Bundle, onnx_path: str, per_task_onnx_bytes: int) -> dict[str, int]:
    """Bytes to ship: bundle + one (weightless) switchable graph vs N per-task ONNX files."""
    ours = os.path.getsize(bundle.path) + os.path.getsize(onnx_path)
    return {"bundle_plus_onnx": ours, "per_task_onnx": per_task_onnx_bytes * len(bundle.tasks)}
