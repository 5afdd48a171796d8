"""Switch tasks in ONNX Runtime without rebuilding anything: ``TaskSession``.

>>> s = TaskSession(open_bundle("tasks.safetensors"), "model.switchable.onnx")   # doctest: +SKIP
>>> s.switch("sst2"); logits, = s.run({"input_ids": ids, "attention_mask": am})   # doctest: +SKIP

Two modes (``docs/runtime.md`` has the measurements behind the default):

- ``"inputs"`` (default): one session over the *switchable* graph, whose bundle-managed weights
  are graph inputs. Their buffers are allocated once and wrapped as OrtValues without a copy;
  ``switch`` rewrites them in place with the mask kernel. No session work per switch, memory of
  one model; ONNX Runtime cannot pre-pack weights that are inputs, so inference is slower. A
  graph exported with ``layout="auto"`` names a second one with the same feeds (its GEMMs as
  ``(W @ xᵀ)ᵀ``): on the first call of each input shape (dims rounded up to powers of two) both
  are timed and the faster runs from then on.
- ``"sessions"``: one session per task over the *plain* graph. Its managed initializers are
  turned into external-data references (a small in-memory skeleton) and θ_t is handed over with
  ``SessionOptions.add_external_initializers``, which ONNX Runtime applies *before* any graph
  optimization. (``add_initializer`` is not used: constant folding, Conv+BN fusion and layout
  transforms read the file's θ0 values, not the override, and served θ0 for some weights.) Full
  optimization and pre-packing, but a session per task (built on first use) and N copies of the
  managed weights in memory.

Thread safety: ``run`` may be called from many threads while another calls ``switch``; a switch
waits for the runs in flight and blocks new ones until the weights are complete, so no run ever
sees a mix of two tasks' weights. Weights are always rebuilt absolutely from θ0, never by deltas.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import BackendError, ConfigError, FormatError
from .bundle import Bundle, open_bundle
from .dtypes import DTYPES
from .codecs import Recipe, SwitchPlan
from .safetensors import parse_json

MODES = ("inputs", "sessions")
BASE_ID_KEY = "edgemerge.base_id"
WEIGHTS_KEY = "edgemerge.weights"
TRANSPOSED_KEY = "edgemerge.transposed"  # 2-D weights the switchable graph takes as Wᵀ (export/layout.py)
ALTERNATE_KEY = "edgemerge.alternate"  # export layout="auto": the few-rows graph beside this one, same feeds
# SessionOptions cannot be copied; a per-task session gets a fresh one with these copied over.
# For anything else (custom ops, providers' own options) pass a callable that returns new options.
_OPTION_ATTRS = ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                 "execution_order", "enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse",
                 "log_severity_level", "log_verbosity_level", "logid", "use_deterministic_compute")
_CONFIG_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning", "session.disable_prepacking",
                "session.set_denormal_as_zero", "session.use_env_allocators", "session.intra_op_thread_affinities",
                "session.disable_cpu_ep_fallback", "session.qdq_matmulnbits_accuracy_level")
SPIN_KEY = "session.intra_op.allow_spinning"
EXTERNAL_LOCATION = "edgemerge-task-weights"  # never opened: every such initializer is supplied in memory
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
            self.bundle.check_file()
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
                self.bundle.check_file()
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
                 providers: Sequence[str] | None = None, session_options=None, alternate: bool = True):
        """``session_options``: an ``onnxruntime.SessionOptions`` (in ``sessions`` mode each task's
        session gets a fresh copy of its documented attributes and config keys) or a callable that
        returns a new one per session, for settings that cannot be copied. ``alternate``: in
        ``inputs`` mode, also load the graph the file's metadata names (export ``layout="auto"``)
        and run, per input shape, whichever of the two was faster on its first call there."""
        if mode not in MODES:
            raise ConfigError(f"unknown runtime mode {mode!r}; valid: {', '.join(MODES)}")
        self.bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
        self.mode, self.onnx_path = mode, onnx_path
        self._ort = _ort()
        self._providers = list(providers or ["CPUExecutionProvider"])
        self._options = session_options
        self._init_switching()
        probe = self._new_session()
        self._check_base(probe)
        self.transposed = self._transposed(probe) if mode == "inputs" else set()
        self.weights, self.data_inputs = self._match_inputs(probe)
        self.output_names = [o.name for o in probe.get_outputs()]
        declared = {i.name: i for i in probe.get_inputs()}
        self._data_types = {n: (DTYPES.get(_ORT_TYPES.get(declared[n].type, "")), declared[n].shape) for n in self.data_inputs}
        # graph weight name -> its bundle param (a tied name resolves to the param it is stored as)
        by_name = {p.name: p for p in self.bundle.params}
        self._params = {n: by_name[self.bundle.resolve(n)] for n in self.weights if self.bundle.resolve(n) in by_name}
        if mode == "inputs":
            self._graphs = [(onnx_path, probe)] + (self._alternates(probe, declared) if alternate else [])
            self._chosen: dict[tuple, int] = {}  # input shapes -> index in _graphs, timed on first use
            self._buffers = {n: np.empty(self._fed(n, p.shape), DTYPES[p.dtype]) for n, p in self._params.items() if p.role == "merged"}
            # weights fed transposed: θ0 and τ kept in that order, masks permuted once per task
            b = self.bundle
            self._t_parts = {n: (_t(b.base(p.name)), {"tall": _t(b.vector(p.name)) if b.shared else None,
                                                     "emr": _t(b.elected_vector(p.name)) if b.elected else None})
                             for n, p in self._params.items() if n in self.transposed and p.role == "merged"}
            self._t_recipes: dict[tuple[str, str], Recipe] = {}
            self._plans: dict[str, SwitchPlan] = {}  # per task, built at its first switch
            for n, p in self._params.items():
                if p.role == "carried":
                    base = self.bundle.base(p.name)
                    self._buffers[n] = _t(base) if n in self.transposed else np.array(base)
            self._values = {n: self._ort.OrtValue.ortvalue_from_numpy(b) for n, b in self._buffers.items()}
            self._local, self._generation = threading.local(), 0  # per thread: an IOBinding, weights bound per switch
        else:
            del probe  # it holds θ0's weights; each task gets its own session from a skeleton
            self._graph = _load_graph(self.onnx_path, self.weights)
            self._sessions: dict[str, object] = {}

    # -- checks ---------------------------------------------------------------------------------
    def _session_options(self):
        """A fresh SessionOptions for one session: the caller's (copied, or from their callable)."""
        given = self._options
        if callable(given):
            return given()
        opts = self._ort.SessionOptions()
        if given is not None:
            for attr in _OPTION_ATTRS:
                setattr(opts, attr, getattr(given, attr))
            for key in _CONFIG_KEYS:
                try:
                    opts.add_session_config_entry(key, given.get_session_config_entry(key))
                except RuntimeError:  # not set by the caller
                    pass
        try:
            opts.get_session_config_entry(SPIN_KEY)
        except RuntimeError:
            # ONNX Runtime's workers spin-wait after a run; that steals the cores the mask kernel
            # needs right after inference (switch 1.5-2x slower, bench/switch_bench.py), while
            # inference itself barely changes. Set the key in session_options to choose otherwise.
            opts.add_session_config_entry(SPIN_KEY, "0")
        return opts

    def _new_session(self, weights: Mapping[str, np.ndarray] | None = None, path: str | None = None):
        """A session over the file (or ``path``), or -- with ``weights`` -- over the skeleton with
        those weights."""
        opts = self._session_options()
        model: object = path or self.onnx_path
        if weights is not None:
            names = list(weights)
            opts.add_external_initializers(names, [self._ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
            model = _skeleton(self._graph, weights)
        try:
            return self._ort.InferenceSession(model, sess_options=opts, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            hint = _dtype_hint({p.dtype for p in self.bundle.params}, self._providers, str(exc))
            raise BackendError(f"{path or self.onnx_path}: ONNX Runtime could not load the model: {_first_line(exc)}{hint}") from None

    def _alternates(self, probe, declared) -> list[tuple[str, object]]:
        """The graph this one's metadata names (export ``layout="auto"``), checked to take exactly
        the same feeds."""
        name = probe.get_modelmeta().custom_metadata_map.get(ALTERNATE_KEY)
        if not name:
            return []
        path = os.path.join(os.path.dirname(self.onnx_path), name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise FormatError(f"{self.onnx_path} names {name!r} as its few-rows graph and {path} is not there; "
                              "re-export with `edgemerge export onnx --layout auto`, or pass alternate=False")
        other = self._new_session(path=path)
        meta, theirs = probe.get_modelmeta().custom_metadata_map, other.get_modelmeta().custom_metadata_map
        same = all(meta.get(k) == theirs.get(k) for k in (BASE_ID_KEY, WEIGHTS_KEY, TRANSPOSED_KEY))
        inputs = {i.name: (i.type, i.shape) for i in other.get_inputs()}
        if not same or inputs != {n: (i.type, i.shape) for n, i in declared.items()} or \
                [o.name for o in other.get_outputs()] != self.output_names:
            raise FormatError(f"{path} does not take the same weights and inputs as {self.onnx_path}; "
                              "re-export both with `edgemerge export onnx --layout auto`")
        return [(path, other)]

    def _check_base(self, session) -> None:
        meta = session.get_modelmeta().custom_metadata_map
        want = meta.get(BASE_ID_KEY)
        if want is None:
            raise FormatError(f"{self.onnx_path}: no {BASE_ID_KEY} metadata; export it with `edgemerge export onnx`")
        if want != self.bundle.base_id:
            raise FormatError(f"{self.onnx_path} was exported from another base model than {self.bundle.path} "
                              f"(base id {want[:12]}… vs {self.bundle.base_id[:12]}…); re-export it from this bundle")

    def _transposed(self, session) -> set[str]:
        meta = session.get_modelmeta().custom_metadata_map
        names = parse_json(meta.get(TRANSPOSED_KEY, "[]"), f"{self.onnx_path}: {TRANSPOSED_KEY} metadata")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FormatError(f"{self.onnx_path}: {TRANSPOSED_KEY} metadata must be a list of weight names")
        return set(names)

    def _fed(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape a weight is fed in: the bundle's, or reversed for a transposed 2-D weight."""
        return tuple(shape)[::-1] if name in self.transposed else tuple(shape)

    def _match_inputs(self, session) -> tuple[list[str], list[str]]:
        """Graph weight names vs the bundle: one error that lists every mismatch."""
        meta = session.get_modelmeta().custom_metadata_map
        weights = parse_json(meta.get(WEIGHTS_KEY, "[]"), f"{self.onnx_path}: {WEIGHTS_KEY} metadata")
        if not isinstance(weights, list) or not all(isinstance(n, str) for n in weights):
            raise FormatError(f"{self.onnx_path}: {WEIGHTS_KEY} metadata must be a list of weight names")
        params = {p.name: p for p in self.bundle.params}
        params.update({a: params[t] for a, t in self.bundle.aliases.items() if t in params})
        graph = {i.name: i for i in session.get_inputs()}
        if self.mode == "sessions":
            from .onnx_graph import initializer_specs

            graph_w = initializer_specs(self.onnx_path)
        else:
            graph_w = {n: (_ORT_TYPES.get(graph[n].type, graph[n].type), graph[n].shape) for n in weights if n in graph}
        _check_graph_kind(self.onnx_path, self.mode, weights, graph_w, graph)
        problems = [f"weight {n!r} is listed as transposed but is not a graph weight" for n in sorted(self.transposed - set(weights))]
        for n in weights:
            if n not in graph_w:
                problems.append(f"weight {n!r} is listed in the metadata but not in the graph")
                continue
            dtype, shape = graph_w[n]
            for task in self.bundle.tasks:
                if n in params:
                    want = (params[n].dtype, params[n].shape)
                elif n in self.bundle.private_keys[task]:
                    want = (self.bundle.private_dtype(task, n), self.bundle.header.tensors[f"task/{task}/{n}"].shape)
                else:
                    problems.append(f"weight {n!r} (graph) is not in the bundle for task {task!r}")
                    continue
                resizable = self.mode == "sessions" and n in self.bundle.private_keys[task]
                if n in self.transposed and len(want[1]) != 2:
                    problems.append(f"weight {n!r} is listed as transposed but has shape {list(want[1])} in the bundle")
                    continue
                fed = self._fed(n, want[1])
                if dtype != want[0] or not (resizable and len(shape) == len(fed) or _shape_ok(shape, fed)):
                    t = " (transposed)" if n in self.transposed else ""
                    problems.append(f"weight {n!r}: graph has {dtype} {list(shape)}{t}, bundle task {task!r} has {want[0]} {list(want[1])}")
        if problems:
            raise FormatError(f"{self.onnx_path} does not match {self.bundle.path}:\n  " + "\n  ".join(dict.fromkeys(problems)))
        data = [n for n in graph if n not in weights]
        return weights, data

    # -- switching ------------------------------------------------------------------------------
    def _switch_locked(self, task: str) -> float:
        t0 = time.perf_counter()
        if self.mode == "inputs":
            if task not in self._plans:
                self._plans[task] = self._switch_plan(task)
            self._plans[task].run()
            self._generation += 1
            private = self.bundle.private(task)
            for n in self.weights:
                if n in private:
                    a = private[n]
                    self._values[n] = self._ort.OrtValue.ortvalue_from_numpy(_t(a) if n in self.transposed else np.array(a))
        elif task not in self._sessions:
            self._sessions[task] = self._build_task_session(task)
        self.current = task
        return time.perf_counter() - t0

    def resident_bytes(self) -> dict[str, int]:
        """Memory this session holds besides ONNX Runtime's own: the weight buffers it feeds
        (``inputs``), the transposed θ0/τ copies and permuted masks of weights fed transposed. The
        bundle's mapped data (θ0, τ_MTL, masks) comes on top while it stays in the page cache."""
        n = lambda arrays: sum(a.nbytes for a in arrays if a is not None)  # noqa: E731
        if self.mode != "inputs":
            return {"weight buffers": 0, "transposed copies": 0}
        return {"weight buffers": n(self._buffers.values()),
                "transposed copies": n(a for base, vectors in self._t_parts.values() for a in (base, *vectors.values()))
                + sum(r.nbytes for r in self._t_recipes.values())}

    def _switch_plan(self, task: str) -> SwitchPlan:
        """The task's rebuild of every fed weight buffer, built at its first switch (weights fed
        transposed take their transposed θ0 / τ and permuted recipes)."""
        c = self.bundle.codecs[self.bundle.check_task(task)]
        items = []
        for n, buf in self._buffers.items():
            p = self._params[n].name
            if self._params[n].role != "merged":
                continue
            if n in self._t_parts:
                base, vectors = self._t_parts[n]
                items.append((base, vectors.get(c.name), self._t_recipe(task, n, p), buf))
            else:
                items.append(self.bundle.plan_item(task, p, buf))
        return SwitchPlan(items)

    def _t_recipe(self, task: str, name: str, param: str) -> Recipe:
        """The task's recipe of a transposed weight, its bits (δ, positions) permuted like the weight
        (once per task)."""
        key = (task, name)
        if key not in self._t_recipes:
            self._t_recipes[key] = self.bundle.recipe(task, param).transposed(self._params[name].shape)
        return self._t_recipes[key]

    def _build_task_session(self, task: str):
        # add_external_initializers copies the data into the session, so nothing is kept here
        weights = self.bundle.task_weights(task)
        return self._new_session({n: np.ascontiguousarray(weights[self.bundle.resolve(n)]) for n in self.weights})

    # -- inference ------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray, task: str | None = None) -> list[np.ndarray]:
        """Run the current task -- or ``task``, switching first if needed, atomically with the run.

        ``inputs`` maps data input names to arrays (or is one array for a one-input model).
        """
        return self._locked(task, lambda: self._run_locked(inputs))

    def _run_locked(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        inputs = self._feeds(inputs)
        if self.current is None:
            raise ConfigError(f"no task selected: call switch() first; tasks: {', '.join(self.tasks)}")
        try:
            if self.mode == "sessions":
                return self._sessions[self.current].run(self.output_names, inputs)
            key = _shape_key(inputs)
            which = self._chosen.get(key)
            if which is None:
                which = self._chosen[key] = self._fastest(inputs)
            return self._run_graph(which, inputs)
        except Exception as exc:  # onnxruntime's own exception types: one line, with what was passed
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in inputs.items())
            raise BackendError(f"{self.onnx_path}: ONNX Runtime refused the inputs ({shapes}): {_first_line(exc)}") from None

    def _feeds(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """The data inputs by name, each as the graph declares it; a ConfigError naming what is wrong."""
        if not isinstance(inputs, Mapping):
            if len(self.data_inputs) != 1:
                raise ConfigError(f"this model takes {len(self.data_inputs)} inputs: pass a dict with {', '.join(self.data_inputs)}")
            inputs = {self.data_inputs[0]: inputs}
        unknown = sorted(set(inputs) - set(self.data_inputs))
        missing = sorted(set(self.data_inputs) - set(inputs))
        if unknown or missing:
            raise ConfigError(f"model inputs are {', '.join(self.data_inputs)}; got unknown {unknown}, missing {missing}")
        return {n: self._conform(n, a) for n, a in inputs.items()}

    def _run_graph(self, which: int, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        binding = self._binding(which)
        for n, a in inputs.items():
            binding.bind_cpu_input(n, a)
        binding.clear_binding_outputs()
        for o in self.output_names:
            binding.bind_output(o, "cpu")
        self._graphs[which][1].run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _fastest(self, inputs: Mapping[str, np.ndarray], rounds: int = 3, least: float = 0.05, most: int = 20) -> int:
        """Index of the graph with the lowest best time over interleaved runs on these inputs (after
        one untimed run each): ``rounds`` at least, more until each graph has run ``least`` seconds
        (a 4 ms call is not judged on three samples), ``most`` at most; 0 when there is one graph."""
        if len(self._graphs) == 1:
            return 0
        best, spent = [float("inf")] * len(self._graphs), [0.0] * len(self._graphs)
        for r in range(most + 1):
            if r > rounds and min(spent) >= least:
                break
            for i in range(len(self._graphs)):
                t0 = time.perf_counter()
                self._run_graph(i, inputs)
                took = time.perf_counter() - t0
                if r:
                    best[i], spent[i] = min(best[i], took), spent[i] + took
        return best.index(min(best))

    def layouts(self) -> dict[tuple, str]:
        """The graph each input shape seen so far runs on: ``((input, shape), ...) -> path``, every
        dim rounded up to a power of two (a sequence of 17..32 tokens is timed once)."""
        return {key: self._graphs[i][0] for key, i in self._chosen.items()}

    def layout(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> str | None:
        """The graph (its path) that inputs of this shape run on; None before the first such call."""
        which = self._chosen.get(_shape_key(self._feeds(inputs))) if self.mode == "inputs" else None
        return None if which is None else self._graphs[which][0]

    def _binding(self, which: int):
        """This thread's IOBinding of graph ``which``, its weights bound once per switch: a call
        then passes only the data inputs, not every weight by name. It keeps the thread's last
        inputs referenced."""
        local = self._local
        if not hasattr(local, "bindings"):
            local.bindings, local.generations = {}, {}
        if local.generations.get(which) != self._generation:  # runs hold the read lock: no switch now
            binding = local.bindings.get(which) or self._graphs[which][1].io_binding()
            for n, v in self._values.items():
                binding.bind_ortvalue_input(n, v)
            local.bindings[which], local.generations[which] = binding, self._generation
        return local.bindings[which]

    def _conform(self, name: str, a) -> np.ndarray:
        """The input as the graph declares it: integers widened where lossless (int32 token ids for
        an int64 input), any other dtype or rank mismatch a ConfigError naming the input."""
        a = np.ascontiguousarray(a)
        want, shape = self._data_types[name]
        if want is not None and a.dtype != want:
            if not (a.dtype.kind in "iub" and want.kind in "iu" and np.can_cast(a.dtype, want, "safe")):
                raise ConfigError(f"input {name!r} is {a.dtype}, the graph takes {want}: pass it as .astype(np.{want.name})")
            a = a.astype(want)
        bad = len(shape) != a.ndim or any(isinstance(d, int) and d != n for d, n in zip(shape, a.shape))
        if bad:
            dims = [d if isinstance(d, int) else "any" for d in shape]
            raise ConfigError(f"input {name!r} has shape {list(a.shape)}, the graph takes {dims} (re-export with "
                              "dynamic axes to change a fixed one)")
        return a


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _shape_key(inputs: Mapping[str, np.ndarray]) -> tuple:
    """What one timing of the graphs covers: each input's shape, every dim rounded up to a power of two."""
    return tuple((n, _bucket(a.shape)) for n, a in sorted(inputs.items()))


def _bucket(shape: Sequence[int]) -> tuple[int, ...]:
    """Each dim rounded up to a power of two: the shapes that share one timing of the graphs."""
    return tuple(1 << (d - 1).bit_length() if d > 0 else 0 for d in shape)


def _t(a) -> np.ndarray:
    """A 2-D array transposed into its own C-contiguous memory."""
    return np.ascontiguousarray(np.asarray(a).T)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise BackendError("sessions mode needs onnx: pip install 'edgemerge[onnx]'") from None
    return onnx


def _load_graph(path: str, weights: Sequence[str]):
    """The plain graph without the bytes of the weights each task supplies (θ0 is not kept twice)."""
    model = _onnx().load(path)
    wanted = set(weights)
    for init in model.graph.initializer:
        if init.name in wanted:
            for fld in _DATA_FIELDS:
                init.ClearField(fld)
    return model


def _skeleton(graph, weights: Mapping[str, np.ndarray]) -> bytes:
    """The plain graph (from ``_load_graph``: the managed initializers' bytes already dropped) with
    those initializers turned into external-data references (never opened: ``add_external_initializers``
    supplies them before any optimization runs), each with the shape of the weight given -- a task
    head may have another size than the file's."""
    onnx = _onnx()
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    resized = False
    for init in model.graph.initializer:
        if init.name not in weights:
            continue
        a = weights[init.name]
        resized |= tuple(init.dims) != a.shape
        del init.external_data[:]
        init.dims[:] = a.shape
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", EXTERNAL_LOCATION), ("offset", "0"), ("length", str(a.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    if resized:  # stale static shapes downstream of a resized head would contradict it
        del model.graph.value_info[:]
        for out in model.graph.output:
            for k, dim in enumerate(out.type.tensor_type.shape.dim):
                if dim.HasField("dim_value"):
                    dim.ClearField("dim_value")
                    dim.dim_param = f"{out.name}_dim{k}"
    return model.SerializeToString()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _dtype_hint(dtypes: set[str], providers: Sequence[str], error: str) -> str:
    """The cause when a half-precision graph does not load for want of kernels (ONNX Runtime says
    NOT_IMPLEMENTED, or a type error while resolving one); nothing for other failures."""
    name = "bfloat16" if "BF16" in dtypes else "float16" if "F16" in dtypes else None
    if name is None or not ("NOT_IMPLEMENTED" in error or "Type Error" in error):
        return ""
    return (f" -- the weights are {name} and {', '.join(providers)} has no {name} kernel for some node of this graph "
            f"(ONNX Runtime's CPU provider has few): export the model in float32 (merge float32 checkpoints), "
            f"or use a provider with {name} support (CUDA, TensorRT)")


def _check_graph_kind(path: str, mode: str, weights: list[str], graph_w: Mapping, graph_inputs: Mapping) -> None:
    """One line, not one per weight, when the graph is the other kind than the mode needs."""
    if not weights or any(n in graph_w for n in weights):
        return
    if mode == "sessions" and any(n in graph_inputs for n in weights):
        raise FormatError(f"{path} is a switchable graph (weights are inputs); mode='sessions' needs the plain graph "
                          "(model.plain.onnx), or use mode='inputs' with this one")
    if mode == "inputs":
        raise FormatError(f"{path} has none of its weights as graph inputs (a plain graph?); mode='inputs' needs the switchable graph "
                          "(model.switchable.onnx), or use mode='sessions' with this one")
