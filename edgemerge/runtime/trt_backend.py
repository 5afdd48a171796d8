"""Switch tasks in a refittable TensorRT engine: ``TrtTaskSession`` (TensorRT and torch lazily).

>>> s = TrtTaskSession(open_bundle("tasks.safetensors"), "model.plan")   # doctest: +SKIP
>>> s.switch("sst2"); logits, = s.run({"image": x})                      # doctest: +SKIP

The engine is built once from the plain ONNX graph (``edgemerge export tensorrt``), refittable in
the weights the bundle manages. θ0, τ_MTL and the packed masks stay resident on the GPU
(:class:`~edgemerge.runtime.torch_backend.FlatWeights`); a switch rebuilds θ_t with the fused
kernel into persistent device buffers that were registered once with
``Refitter.set_named_weights(name, weights, TensorLocation.DEVICE)`` and calls
``refit_cuda_engine_async`` (TensorRT ≥ 10). TensorRT 8.5 / 8.6 (JetPack 5.1 / 6.0) has neither:
there θ_t is rebuilt on the host into buffers handed over as host weights and refit synchronously.
Before writing, a switch synchronizes the device: TensorRT must never refit while work that uses
the engine is enqueued on any stream.

Not verified on hardware by this project: TensorRT is installed on none of its machines. The
tests in tests/test_tensorrt.py run wherever ``tensorrt`` and CUDA import and compare a refit
engine's outputs with ONNX Runtime (TensorRT 11.3 documents a REFIT bug that drops a GEMM bias).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import numpy as np

from ..errors import BackendError, ConfigError, FormatError
from .bundle import Bundle, open_bundle
from .dtypes import DTYPES
from .session import Switchable


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); ConfigError for anything that is not dotted integers.

    >>> parse_version("8.6.2.3")
    (8, 6, 2, 3)
    """
    try:
        return tuple(int(p) for p in str(text).split("."))
    except ValueError:
        raise ConfigError(f"TensorRT version {text!r} is not dotted integers") from None


def refit_features(version: tuple[int, ...]) -> dict[str, Any]:
    """What a TensorRT version offers for refitting, as used here (tested for every gate).

    >>> refit_features((8, 6))["flag"], refit_features((10, 2))["flag"]
    ('REFIT', 'REFIT_INDIVIDUAL')
    """
    if version < (8, 5):
        raise BackendError(f"TensorRT {'.'.join(map(str, version))} is too old: named-weight refit with "
                           "execute_async_v3 needs TensorRT ≥ 8.5 (JetPack ≥ 5.1)")
    return {
        "flag": "REFIT_INDIVIDUAL" if version >= (10, 2) else "REFIT",  # + mark_weights_refittable per name
        "strip_plan": version >= (10, 0),       # BuilderFlag.STRIP_PLAN: a weightless plan
        "device_weights": version >= (10, 0),   # set_named_weights(..., TensorLocation.DEVICE) + refit_cuda_engine_async
        "gemm_bias_bug": version[:2] == (11, 3),  # release notes: REFIT may drop a GEMM bias; check outputs
    }


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed: pip install 'edgemerge[tensorrt]' (or use JetPack's)") from None
    return tensorrt


def match_refit_names(engine_names, bundle_names, missing_after_set=()) -> list[str]:
    """Problems between an engine's refittable weights and the bundle, each naming the weights."""
    engine_names, bundle_names = set(engine_names), set(bundle_names)
    problems = []
    absent = sorted(bundle_names - engine_names)
    if absent:
        problems.append(f"not refittable in the engine (rebuild it with `edgemerge export tensorrt`): {', '.join(absent)}")
    missing = sorted(set(missing_after_set))
    if missing:
        problems.append(f"TensorRT also needs these weights, which the bundle does not hold: {', '.join(missing)}")
    return problems


class TrtTaskSession(Switchable):
    """One refittable engine, N tasks from one bundle; ``switch(task)`` then ``run(inputs)``."""

    def __init__(self, bundle: Bundle | str, engine_path: str, kernel: str = "auto"):
        trt = _trt()
        import torch

        from .torch_backend import FlatWeights, to_torch, triton_available

        self.bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
        self.trt, self.torch = trt, torch
        self.features = refit_features(parse_version(trt.__version__))
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendError(f"{engine_path}: TensorRT could not deserialize the engine (built by another version or GPU?)")
        self.refitter = trt.Refitter(self.engine, self._logger)
        refittable = self._refittable = set(self.refitter.get_all_weights())
        merged = [p.name for p in self.bundle.params if p.role == "merged"]
        private = sorted({k for ks in self.bundle.private_keys.values() for k in ks} & refittable)
        problems = match_refit_names(refittable, merged)
        if problems:
            raise FormatError(f"{engine_path} does not match {self.bundle.path}:\n  " + "\n  ".join(problems))
        device = torch.device("cuda")
        self._dtypes = {torch.float32: trt.float32, torch.float16: trt.float16}
        if hasattr(trt, "bfloat16"):
            self._dtypes[torch.bfloat16] = trt.bfloat16
        self._device_mode = self.features["device_weights"]
        if self._device_mode:
            if kernel == "auto":
                kernel = "triton" if triton_available(device) else "torch"
            self._flat = FlatWeights(self.bundle, merged, device, kernel)
            for n in merged:  # registered once: the buffers persist, a switch rewrites them in place
                self._set(n, self._flat.view(n))
            for alias, n in self.bundle.aliases.items():  # a tied name the graph kept: the same buffer
                if alias in refittable and n in merged:
                    self._set(alias, self._flat.view(n))
        else:  # TensorRT 8.5 / 8.6: host weights, rebuilt by the numpy kernel into buffers kept here
            self._host = {n: np.empty(self.bundle.param(n).shape, DTYPES[self.bundle.param(n).dtype]) for n in merged}
            self._plans: dict[str, Any] = {}  # per task, built at its first switch
        self._private = {t: {k: to_torch(v, self.bundle.private_dtype(t, k), device)
                                 if self._device_mode else np.array(v)
                             for k, v in self.bundle.private(t).items() if k in private} for t in self.bundle.tasks}
        carried = {p.name for p in self.bundle.params if p.role == "carried"}
        self._carried_names = (carried | {a for a, n in self.bundle.aliases.items() if n in carried}) & refittable
        self._carried: dict[str, Any] = {}  # θ0 of carried weights TensorRT asked for, kept alive
        self.context = self.engine.create_execution_context()
        self._context_lock = threading.Lock()
        self.stream = torch.cuda.Stream()
        self.inputs = [n for n in self._io_names() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self._io_names() if n not in self.inputs]
        self._init_switching()

    def _io_names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _set(self, name: str, value) -> None:
        """Hand ``value`` to the refitter: a CUDA tensor as device weights, a numpy array as host weights."""
        trt = self.trt
        if isinstance(value, np.ndarray):
            ok = self.refitter.set_named_weights(name, trt.Weights(value))
        else:
            w = trt.Weights(self._dtypes[value.dtype], value.data_ptr(), value.numel())
            ok = self.refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE)
        if not ok:
            raise BackendError(f"TensorRT rejected weights {name!r} ({value.dtype}, {value.size if isinstance(value, np.ndarray) else value.numel()} "
                               "values): name, count or type differs from the engine's -- rebuild it from this bundle")

    def _refill(self, missing) -> list[str]:
        """Hand over θ0 for carried weights TensorRT asks for (fused with a weight that changed, on
        engines where every weight is refittable); return what is still missing."""
        again = [n for n in missing if n in self._carried_names]
        for n in again:
            if n not in self._carried:
                from .torch_backend import to_torch

                b, dtype = self.bundle.base(self.bundle.resolve(n)), self.bundle.param(self.bundle.resolve(n)).dtype
                self._carried[n] = to_torch(b, dtype, self.torch.device("cuda")) if self._device_mode else np.array(b)
            self._set(n, self._carried[n])
        return list(self.refitter.get_missing_weights()) if again else list(missing)

    def _switch_locked(self, task: str) -> float:
        torch = self.torch
        torch.cuda.synchronize()  # never refit while work that reads the engine is enqueued anywhere
        t0 = time.perf_counter()
        if self._device_mode:
            self._flat.apply(task)
        else:
            if task not in self._plans:
                self._plans[task] = self.bundle.switch_plan(task, self._host)
            self._plans[task].run()
            for n, buf in self._host.items():
                self._set(n, buf)
            for alias, n in self.bundle.aliases.items():
                if n in self._host and alias in self._refittable:
                    self._set(alias, self._host[n])
        for k, v in self._private[task].items():
            self._set(k, v)
        missing = self._refill(self.refitter.get_missing_weights())
        if missing:
            raise FormatError("\n  ".join([f"cannot refit {task!r}:", *match_refit_names([], [], missing)]))
        if self._device_mode:
            self.stream.wait_stream(torch.cuda.current_stream())  # the kernel's writes come first
            ok = self.refitter.refit_cuda_engine_async(self.stream.cuda_stream)
            self.stream.synchronize()
        else:
            ok = self.refitter.refit_cuda_engine()
        if not ok:
            raise BackendError(f"TensorRT refit failed for task {task!r} (see the TensorRT log above)")
        self.current = task
        return time.perf_counter() - t0

    def run(self, inputs: Mapping[str, Any], task: str | None = None) -> list:
        """Run on CUDA tensors or numpy arrays (name -> array); returns the outputs as CUDA tensors."""
        return self._locked(task, lambda: self._run_locked(inputs))

    def _run_locked(self, inputs: Mapping[str, Any]) -> list:
        torch = self.torch
        if set(inputs) != set(self.inputs):
            raise ConfigError(f"engine inputs are {', '.join(self.inputs)}; got {', '.join(sorted(inputs))}")
        keep = {n: torch.as_tensor(a, device="cuda").contiguous() for n, a in inputs.items()}
        with self._context_lock:  # one execution context: runs from several threads take turns
            return self._execute(keep)

    def _execute(self, keep: dict) -> list:
        torch = self.torch
        for n, t in keep.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        outs = []
        for n in self.outputs:
            dtype = getattr(torch, _OUT_DTYPES.get(self.engine.get_tensor_dtype(n).name, "float32"))
            out = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(n, out.data_ptr())
            outs.append(out)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.stream.synchronize()
        return outs


_OUT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}  # TensorRT DataType name -> torch dtype
