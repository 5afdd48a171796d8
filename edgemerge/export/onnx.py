"""Export a torch model + a bundle to ONNX: a *plain* graph and a *switchable* one.

- plain: weights are initializers named exactly like the state-dict keys (θ0, or one task baked
  in). What TensorRT refit and the "one ONNX file per task" baseline need.
- switchable: the same graph with every bundle-managed weight (merged params, carried buffers,
  the task-private tensors) turned from an initializer into a graph input of the same name, so
  ``edgemerge.runtime.TaskSession`` can feed rebuilt weights without touching the session.

Names: the TorchScript exporter with constant folding off keeps parameter names as initializer
names. We never guess: after export every managed name is looked up in the graph; a weight the
graph does not use is reported, and an exporter-renamed weight (``onnx::…``) is an error.

The model comes from a factory the user names as ``package.module:function``; it is called as
``factory(task)`` -- or ``factory(task, shapes)`` when it takes two arguments, ``shapes`` mapping
every weight to be loaded to its shape (to size a head) -- and returns the ``nn.Module``
(architecture only), ``(module, example_inputs)`` or ``(module, example_inputs, dynamic_axes)``.
Without ``dynamic_axes`` the batch dim of every input and output is dynamic, and the sequence dim
of integer inputs (token ids, masks) and of per-token outputs (``default_dynamic_axes``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BackendError, ConfigError, FormatError
from ..io import atomic_output
from ..runtime.bundle import Bundle, open_bundle
from ..runtime.session import ALTERNATE_KEY, BASE_ID_KEY, TRANSPOSED_KEY, WEIGHTS_KEY
from .layout import fast_gemm_layout, weights_left_layout

TASK_KEY = "edgemerge.task"
LAYOUTS = ("fast", "few-rows", "auto", "exporter")


@dataclass
class OnnxExport:
    plain: str
    switchable: str | None
    weights: list[str]                       # managed names that are graph inputs (switchable)
    unused: list[str] = field(default_factory=list)   # bundle tensors the graph does not use
    data_inputs: list[str] = field(default_factory=list)
    transposed: list[str] = field(default_factory=list)  # weights the switchable graph takes as Wᵀ
    alternate: str | None = None  # layout="auto": the few-rows graph, same feeds, beside the switchable one


def load_factory(spec: str) -> Callable:
    """Import ``package.module:function``; ConfigError says what is wrong."""
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ConfigError(f"model factory {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        raise ConfigError(f"model factory {spec!r}: cannot import {mod!r} ({exc})") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise ConfigError(f"model factory {spec!r}: {mod} has no callable {fn!r}")
    return factory


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendError("ONNX export needs torch: pip install 'edgemerge[torch,onnx]'") from None
    return torch


def build_model(factory: Callable, bundle: Bundle, task: str | None, example_inputs=None):
    """(module with weights loaded, example inputs). ``task=None``: θ0 + the first task's private tensors."""
    torch = _torch()
    name = task or bundle.tasks[0]
    if task is None:
        weights = {p.name: np.asarray(bundle.base(p.name)) for p in bundle.params}
        weights.update(bundle.private(name))
    else:
        weights = bundle.task_weights(task)
    takes_shapes = len(inspect.signature(factory).parameters) >= 2
    made = factory(name, {k: tuple(v.shape) for k, v in weights.items()}) if takes_shapes else factory(name)
    made = made if isinstance(made, tuple) else (made, example_inputs)
    model, example = made[0], made[1]
    model.edgemerge_dynamic_axes = made[2] if len(made) > 2 else None  # the factory may name its own
    if example is None:
        raise ConfigError("no example inputs: return (module, example_inputs) from the factory or pass example_inputs")
    example = example if isinstance(example, tuple) else (example,)
    from ..runtime.dtypes import dtype_name
    from ..runtime.torch_backend import tied_names, to_torch

    model_state = model.state_dict(keep_vars=True)
    ties = tied_names(model_state)              # the model's own ties (tie_weights): alias -> first name
    root = lambda k: ties.get(k, k)  # noqa: E731
    for alias, target in bundle.aliases.items():  # tied in the bundle, separate in this model: load both
        if alias in model_state and target in weights and root(alias) != root(target):
            weights[alias] = weights[target]
    state = {k: to_torch(v, dtype_name(v.dtype), "cpu") for k, v in _distinct(weights).items()}
    result = model.load_state_dict(state, strict=False)
    loaded = {root(k) for k in state}
    missing = [k for k in result.missing_keys if root(k) not in loaded]  # a tie-mate of a loaded weight is loaded
    if missing:
        raise FormatError(f"the model has weights the bundle lacks: {', '.join(missing[:10])}")
    if result.unexpected_keys:
        raise FormatError(f"the bundle has tensors the model lacks: {', '.join(result.unexpected_keys[:10])}")
    model.edgemerge_ties = ties
    return model.eval(), example, weights


def _distinct(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies in which no two tensors are byte-identical.

    The TorchScript exporter merges initializers with identical values into one (LayerNorm
    weights that are all ones in θ0, zero biases, …). A switchable graph would then feed one input
    to several parameters that differ per task. So duplicates get their first element nudged for
    the export, and ``_restore_exact`` writes the exact values back afterwards.
    """
    out, seen = {}, set()
    for k in sorted(weights):
        a = np.array(weights[k])
        # nudge the bit pattern of the first element: works alike for every int and float dtype,
        # bfloat16 (numpy kind 'V') included; only the export sees it
        bits = a.reshape(-1).view(f"u{a.dtype.itemsize}") if a.size and a.dtype.kind != "b" else None
        nudge = 1
        while bits is not None and (a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).digest()) in seen:
            bits[0] = bits[0] + np.array(nudge, bits.dtype)
            nudge += 1
        seen.add((a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).digest()))
        out[k] = a
    return out


def _restore_exact(proto, exact: dict[str, np.ndarray]) -> None:
    """Overwrite initializers named like a weight with that weight's exact bytes."""
    for init in proto.graph.initializer:
        if init.name not in exact:
            continue
        a = np.ascontiguousarray(exact[init.name])
        if tuple(init.dims) != a.shape:
            raise FormatError(f"initializer {init.name!r} has shape {list(init.dims)}, the weight {list(a.shape)}")
        for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            init.ClearField(fld)
        init.raw_data = a.reshape(-1).view(np.uint8).tobytes()  # edgemerge dtypes are little-endian


def _rename_tied(proto, ties: dict[str, str], managed: set[str]) -> None:
    """The exporter writes a tied tensor once, under one of its names; give it the bundle's name
    (else the switchable graph would keep it as a θ0 constant and a refit would not find it)."""
    groups: dict[str, set[str]] = {}
    for alias, first in ties.items():
        groups.setdefault(first, {first}).add(alias)
    rename = {}
    for names in groups.values():
        wanted = sorted(names & managed)
        for init in proto.graph.initializer:
            if init.name in names and init.name not in managed and wanted:
                rename[init.name] = wanted[0]
    if not rename:
        return
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for graph in _graphs(proto.graph):
        for node in graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]


def _graphs(graph):
    """A graph and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(g)


def _atomic_save(model, path: str) -> None:
    import onnx

    with atomic_output(path) as tmp:
        onnx.save(model, tmp)


def _export_plain(model, example, path: str, input_names, output_names, dynamic_axes, opset: int):
    torch = _torch()
    import onnx

    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, "m.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constants; the differential tests check outputs
            torch.onnx.export(model, example, tmp, input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=False, dynamo=False)
        return onnx.load(tmp)


def _set_meta(model, entries: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v


def export_onnx(
    bundle: Bundle | str,
    factory: Callable | str,
    output_dir: str,
    *,
    example_inputs: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = ("output",),
    dynamic_axes: dict | None = None,
    opset: int = 17,
    task: str | None = None,
    switchable: bool = True,
    name: str = "model",
    layout: str = "fast",
) -> OnnxExport:
    """Write ``<name>.plain.onnx`` (+ ``<name>.switchable.onnx``) into ``output_dir``.

    ``task``: bake θ_task into the plain graph (the per-task baseline); default θ0.
    ``layout``: ``"fast"`` rewrites the switchable graph's GEMMs to take their weights as [N, K]
    with ``transB=1`` (``export/layout.py``); ``"few-rows"`` also puts each such weight on GEMM's
    left, ``(W @ xᵀ)ᵀ``, for calls with few rows (batch 1, short sequences: measured faster there,
    slower at a few hundred rows); ``"auto"`` writes the fast graph and, as ``<name>.few-rows.onnx``
    named in its metadata, the few-rows one: ``TaskSession`` times both on each new input shape and
    runs the faster (the crossover depends on the machine); ``"exporter"`` keeps the exporter's graph.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    import onnx

    bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
    factory = load_factory(factory) if isinstance(factory, str) else factory
    if task is not None:
        bundle.check_task(task)
    model, example, exact = build_model(factory, bundle, task, example_inputs)
    input_names = list(input_names or [f"input{i}" for i in range(len(example))])
    if dynamic_axes is None:
        dynamic_axes = model.edgemerge_dynamic_axes or default_dynamic_axes(model, example, input_names, output_names)
    proto = _export_plain(model, example, "", input_names, output_names, dynamic_axes, opset)
    managed = [p.name for p in bundle.params] + bundle.private_keys[task or bundle.tasks[0]]
    managed += [a for a in bundle.aliases if a in exact]  # tied in the bundle, separate in the model
    _rename_tied(proto, model.edgemerge_ties, set(managed))
    _restore_exact(proto, exact)
    inits = {i.name: i for i in proto.graph.initializer}
    unused = [n for n in managed if n not in inits]
    _check_renamed(bundle, unused, inits, task)
    os.makedirs(output_dir, exist_ok=True)
    meta = {BASE_ID_KEY: bundle.base_id, TASK_KEY: task or "", WEIGHTS_KEY: json.dumps([n for n in managed if n in inits])}
    _set_meta(proto, meta)
    plain_path = os.path.join(output_dir, f"{name}.plain.onnx" if task is None else f"{name}.{task}.onnx")
    _atomic_save(proto, plain_path)
    result = OnnxExport(plain_path, None, [n for n in managed if n in inits], unused, input_names)
    if switchable:
        result.switchable = os.path.join(output_dir, f"{name}.switchable.onnx")
        graph = make_switchable(proto, result.weights, _varying_private(bundle))
        if layout != "exporter":
            result.transposed = fast_gemm_layout(graph, set(result.weights))
            _set_meta(graph, {TRANSPOSED_KEY: json.dumps(result.transposed)})
        if layout == "auto":
            left = type(graph)()
            left.CopyFrom(graph)
            if weights_left_layout(left, set(result.weights)):  # nothing rewritten: one graph serves
                result.alternate = os.path.join(output_dir, f"{name}.few-rows.onnx")
                _atomic_save(left, result.alternate)  # first: the graph that names it lands after it
                _set_meta(graph, {ALTERNATE_KEY: os.path.basename(result.alternate)})
        if layout == "few-rows":
            weights_left_layout(graph, set(result.weights))
        _atomic_save(graph, result.switchable)
    return result


def default_dynamic_axes(model, example, input_names, output_names) -> dict[str, dict[int, str]]:
    """Batch (dim 0) of every input and output; for integer inputs of rank ≥ 2 (token ids,
    attention masks) also the sequence (dim 1), and then dim 1 of outputs of rank ≥ 3 (logits per
    token). Floating-point inputs keep their other dims: an image size is often baked in."""
    torch = _torch()
    axes: dict[str, dict[int, str]] = {}
    has_seq = False
    for name, x in zip(input_names, example):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if not x.is_floating_point() and x.dim() >= 2:
            axes[name][1] = "sequence"
            has_seq = True
    with torch.no_grad():
        outs = model(*example)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for name, y in zip(output_names, outs):
        if isinstance(y, torch.Tensor) and y.dim() >= 1:
            axes[name] = {0: "batch", **({1: "sequence"} if has_seq and y.dim() >= 3 else {})}
    return axes


def _varying_private(bundle: Bundle) -> set[str]:
    """Private keys whose shape differs between tasks (their graph inputs get symbolic dims)."""
    shapes: dict[str, list] = {}
    for t in bundle.tasks:
        for k in bundle.private_keys[t]:
            shapes.setdefault(k, []).append(bundle.header.tensors[f"task/{t}/{k}"].shape)
    return {k for k, s in shapes.items() if len(set(s)) > 1}


def _check_renamed(bundle: Bundle, unused: list[str], inits: dict, task) -> None:
    """A managed weight missing from the graph while an ``onnx::`` initializer of its shape exists."""
    from ..runtime.onnx_graph import ONNX_TO_ST

    shapes = {}
    for n in unused:
        p = next((p for p in bundle.params if p.name == n), None)
        if p is not None:
            shapes[n] = (p.dtype, tuple(p.shape))
    generated = {(ONNX_TO_ST.get(i.data_type), tuple(i.dims)): name for name, i in inits.items() if name.startswith("onnx::")}
    renamed = [f"{n} -> {generated[(d, s)]}" for n, (d, s) in shapes.items() if (d, s) in generated]
    if renamed:
        raise FormatError("the exporter renamed weights, so a task switch could not find them: " + ", ".join(renamed[:10]))


def make_switchable(proto, weights: list[str], varying: set[str]):
    """Copy of ``proto`` with the initializers in ``weights`` turned into graph inputs."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    wanted = set(weights)
    moved = [i for i in g.initializer if i.name in wanted]
    keep = [i for i in g.initializer if i.name not in wanted]
    del g.initializer[:]
    g.initializer.extend(keep)
    for init in moved:
        dims = [f"{init.name}_dim{k}" if init.name in varying else d for k, d in enumerate(init.dims)]
        g.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
    if varying:  # outputs may change shape with the task's head
        for out in g.output:
            for k, dim in enumerate(out.type.tensor_type.shape.dim):
                if dim.HasField("dim_value"):
                    dim.ClearField("dim_value")
                    dim.dim_param = f"{out.name}_dim{k}"
        del g.value_info[:]  # stale static shapes would contradict the new symbolic ones
    return model
