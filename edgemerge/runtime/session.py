"""Switch tasks in ONNX Runtime without rebuilding anything: ``TaskSession``.

>>> s = TaskSession(open_bundle("tasks.safetensors"), "model.switchable.onnx")   # doctest: +SKIP
>>> s.switch("sst2"); logits, = s.run({"input_ids": ids, "attention_mask": am})   # doctest: +SKIP

Two modes (``docs/runtime.md`` has the measurements behind the default):

- ``"inputs"`` (default): one session over the *switchable* graph, whose bundle-managed weights
  are graph inputs. Their buffers are allocated once and wrapped as OrtValues without a copy;
  ``switch`` rewrites them in place with the mask kernel. No session work per switch, memory of
  one model; ONNX Runtime cannot pre-pack weights that are inputs, so inference is slower.
- ``"sessions"``: one session per task over the *plain* graph, θ_t handed over with
  ``SessionOptions.add_initializer`` (zero-copy). Full graph optimization and pre-packing, but a
  session per task (built on first use) and N copies of the managed weights in memory.

Thread safety: ``run`` may be called from many threads while another calls ``switch``; a switch
waits for the runs in flight and blocks new ones until the weights are complete, so no run ever
sees a mix of two tasks' weights. Weights are always rebuilt absolutely from θ0, never by deltas.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import BackendError, ConfigError, FormatError
from .bundle import Bundle, open_bundle
from .dtypes import DTYPES
from .kernel import apply_mask

MODES = ("inputs", "sessions")
BASE_ID_KEY = "edgemerge.base_id"
WEIGHTS_KEY = "edgemerge.weights"
_ORT_TYPES = {"tensor(float)": "F32", "tensor(float16)": "F16", "tensor(bfloat16)": "BF16", "tensor(double)": "F64",
              "tensor(int64)": "I64", "tensor(int32)": "I32", "tensor(int8)": "I8", "tensor(uint8)": "U8", "tensor(bool)": "BOOL"}


class RWLock:
    """Many readers or one writer, granted strictly in arrival order (FIFO).

    A reader that arrives while a writer waits queues behind it, and a writer waits for the
    readers already inside; consecutive readers at the head of the queue enter together. Neither
    side can starve the other -- a thread that switches nonstop cannot lock out ``run`` callers.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: deque[tuple[bool, threading.Event]] = deque()
        self._readers = 0
        self._writer = False

    def _free_for(self, write: bool) -> bool:
        return not self._writer and (not write or self._readers == 0)

    def _take(self, write: bool) -> None:
        if write:
            self._writer = True
        else:
            self._readers += 1

    def _grant(self) -> None:  # under the mutex
        while self._queue and self._free_for(self._queue[0][0]):
            write, event = self._queue.popleft()
            self._take(write)
            event.set()
            if write:
                break

    def _acquire(self, write: bool) -> None:
        with self._mutex:
            if not self._queue and self._free_for(write):
                self._take(write)
                return
            event = threading.Event()
            self._queue.append((write, event))
        event.wait()

    def _release(self, write: bool) -> None:
        with self._mutex:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            self._grant()

    @contextmanager
    def read(self) -> Iterator[None]:
        self._acquire(False)
        try:
            yield
        finally:
            self._release(False)

    @contextmanager
    def write(self, downgrade: bool = False) -> Iterator[None]:
        """Exclusive section; with ``downgrade`` the caller leaves it as a reader, atomically
        (so what it just wrote is what it reads), and must call ``release_read`` later."""
        self._acquire(True)
        done = False
        try:
            yield
            done = True
        finally:
            with self._mutex:
                self._writer = False
                if downgrade and done:  # after an error the caller holds nothing
                    self._readers += 1
                self._grant()

    def release_read(self) -> None:
        self._release(False)


class Switchable:
    """``switch`` / run-as-task locking shared by the backends; a subclass has ``bundle`` and
    ``_switch_locked(task) -> seconds`` and calls ``_init_switching()``."""

    def _init_switching(self) -> None:
        self._lock = RWLock()
        self.current: str | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.bundle.tasks

    def switch(self, task: str) -> float:
        """Make ``task`` current; returns the seconds the weight rebuild took."""
        self.bundle.check_task(task)
        with self._lock.write():
            return self._switch_locked(task)

    def _locked(self, task: str | None, fn):
        """``fn()`` under the read lock, as ``task`` when given: switching first if needed, the
        write lock downgraded atomically, so ``fn`` is guaranteed to see that task's weights."""
        if task is None:
            with self._lock.read():
                if self.current is None:
                    raise ConfigError(f"no task selected: call switch() first; tasks: {', '.join(self.tasks)}")
                return fn()
        self.bundle.check_task(task)
        with self._lock.read():
            if self.current == task:
                return fn()
        with self._lock.write(downgrade=True):
            if self.current != task:
                self._switch_locked(task)
        try:
            return fn()
        finally:
            self._lock.release_read()


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the ONNX Runtime backend needs onnxruntime: pip install 'edgemerge[onnx]'") from None
    return onnxruntime


def _shape_ok(declared: Sequence, actual: tuple[int, ...]) -> bool:
    return len(declared) == len(actual) and all(not isinstance(d, int) or d == a for d, a in zip(declared, actual))


class TaskSession(Switchable):
    """One ONNX model, N tasks from one bundle; ``switch(task)`` then ``run(inputs)``."""

    def __init__(self, bundle: Bundle | str, onnx_path: str, mode: str = "inputs",
                 providers: Sequence[str] | None = None, session_options=None):
        if mode not in MODES:
            raise ConfigError(f"unknown runtime mode {mode!r}; valid: {', '.join(MODES)}")
        self.bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
        self.mode, self.onnx_path = mode, onnx_path
        self._ort = _ort()
        self._providers = list(providers or ["CPUExecutionProvider"])
        self._options = session_options
        self._init_switching()
        probe = self._new_session({})
        self._check_base(probe)
        self.weights, self.data_inputs = self._match_inputs(probe)
        self.output_names = [o.name for o in probe.get_outputs()]
        self._params = {p.name: p for p in self.bundle.params}
        if mode == "inputs":
            self._session = probe
            self._buffers = {n: np.empty(self._params[n].shape, DTYPES[self._params[n].dtype])
                             for n in self.weights if n in self._params and self._params[n].role == "merged"}
            for n in self.weights:
                if n in self._params and self._params[n].role == "carried":
                    self._buffers[n] = np.array(self.bundle.base(n))
            self._values = {n: self._ort.OrtValue.ortvalue_from_numpy(b) for n, b in self._buffers.items()}
        else:
            self._sessions: dict[str, object] = {}
            self._keep: dict[str, dict[str, np.ndarray]] = {}

    # -- checks ---------------------------------------------------------------------------------
    def _new_session(self, initializers: Mapping[str, object]):
        opts = self._options
        if opts is None or initializers:
            opts = self._ort.SessionOptions()
            # ONNX Runtime's workers spin-wait after a run; that steals the cores the mask kernel
            # needs right after inference (switch 1.5-2x slower, bench/switch_bench.py), while
            # inference itself barely changes. Pass session_options to choose otherwise.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            for name, value in initializers.items():
                opts.add_initializer(name, value)
        try:
            return self._ort.InferenceSession(self.onnx_path, sess_options=opts, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.onnx_path}: ONNX Runtime could not load the model ({exc})") from None

    def _check_base(self, session) -> None:
        meta = session.get_modelmeta().custom_metadata_map
        want = meta.get(BASE_ID_KEY)
        if want is None:
            raise FormatError(f"{self.onnx_path}: no {BASE_ID_KEY} metadata; export it with `edgemerge export onnx`")
        if want != self.bundle.base_id:
            raise FormatError(f"{self.onnx_path} was exported from another base model than {self.bundle.path} "
                              f"(base id {want[:12]}… vs {self.bundle.base_id[:12]}…); re-export it from this bundle")

    def _match_inputs(self, session) -> tuple[list[str], list[str]]:
        """Graph weight names vs the bundle: one error that lists every mismatch."""
        meta = session.get_modelmeta().custom_metadata_map
        try:
            weights = list(json.loads(meta.get(WEIGHTS_KEY, "[]")))
        except json.JSONDecodeError:
            raise FormatError(f"{self.onnx_path}: {WEIGHTS_KEY} metadata is not JSON") from None
        params = {p.name: p for p in self.bundle.params}
        graph = {i.name: i for i in session.get_inputs()}
        if self.mode == "sessions":
            from .onnx_graph import initializer_specs

            graph_w = initializer_specs(self.onnx_path)
        else:
            graph_w = {n: (_ORT_TYPES.get(graph[n].type, graph[n].type), graph[n].shape) for n in weights if n in graph}
        problems = []
        for n in weights:
            if n not in graph_w:
                problems.append(f"weight {n!r} is listed in the metadata but not in the graph")
                continue
            dtype, shape = graph_w[n]
            for task in self.bundle.tasks:
                if n in params:
                    want = (params[n].dtype, params[n].shape)
                elif n in self.bundle.private_keys[task]:
                    e = self.bundle.header.tensors[f"task/{task}/{n}"]
                    want = (e.dtype, e.shape)
                else:
                    problems.append(f"weight {n!r} (graph) is not in the bundle for task {task!r}")
                    continue
                if dtype != want[0] or not _shape_ok(shape, want[1]):
                    problems.append(f"weight {n!r}: graph has {dtype} {list(shape)}, bundle task {task!r} has {want[0]} {list(want[1])}")
        if problems:
            raise FormatError(f"{self.onnx_path} does not match {self.bundle.path}:\n  " + "\n  ".join(dict.fromkeys(problems)))
        data = [n for n in graph if n not in weights]
        return weights, data

    # -- switching ------------------------------------------------------------------------------
    def _switch_locked(self, task: str) -> float:
        t0 = time.perf_counter()
        if self.mode == "inputs":
            for n, buf in self._buffers.items():
                if self._params[n].role == "merged":
                    apply_mask(self.bundle.base(n), self.bundle.vector(n), self.bundle.packed_mask(task, n), buf)
            private = self.bundle.private(task)
            for n in self.weights:
                if n in private:
                    self._values[n] = self._ort.OrtValue.ortvalue_from_numpy(np.array(private[n]))
        elif task not in self._sessions:
            self._sessions[task] = self._build_task_session(task)
        self.current = task
        return time.perf_counter() - t0

    def _build_task_session(self, task: str):
        arrays = {n: np.ascontiguousarray(w) for n, w in self.bundle.task_weights(task).items() if n in self.weights}
        arrays = {n: (a if a.flags.writeable else a.copy()) for n, a in arrays.items()}
        self._keep[task] = arrays  # add_initializer does not copy: the arrays must outlive the session
        return self._new_session({n: self._ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})

    # -- inference ------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray, task: str | None = None) -> list[np.ndarray]:
        """Run the current task -- or ``task``, switching first if needed, atomically with the run.

        ``inputs`` maps data input names to arrays (or is one array for a one-input model).
        """
        return self._locked(task, lambda: self._run_locked(inputs))

    def _run_locked(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if not isinstance(inputs, Mapping):
            if len(self.data_inputs) != 1:
                raise ConfigError(f"this model takes {len(self.data_inputs)} inputs: pass a dict with {', '.join(self.data_inputs)}")
            inputs = {self.data_inputs[0]: inputs}
        unknown = sorted(set(inputs) - set(self.data_inputs))
        missing = sorted(set(self.data_inputs) - set(inputs))
        if unknown or missing:
            raise ConfigError(f"model inputs are {', '.join(self.data_inputs)}; got unknown {unknown}, missing {missing}")
        if self.current is None:
            raise ConfigError(f"no task selected: call switch() first; tasks: {', '.join(self.tasks)}")
        if self.mode == "sessions":
            return self._sessions[self.current].run(self.output_names, dict(inputs))
        feeds = dict(self._values)
        for n, a in inputs.items():
            feeds[n] = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
        return [v.numpy() for v in self._session.run_with_ort_values(self.output_names, feeds)]
