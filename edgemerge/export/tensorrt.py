"""Build a refittable TensorRT engine from the plain ONNX graph (``edgemerge export tensorrt``).

Refittable in exactly the weights the bundle manages -- the names ``edgemerge export onnx`` wrote
into the graph's metadata, which are its initializer names and so TensorRT's weight names (the
ONNX parser names weights after initializers):

- TensorRT ≥ 10.2: ``BuilderFlag.REFIT_INDIVIDUAL`` and ``mark_weights_refittable(name)`` for each of
  them, so everything else stays constant and fully optimized;
- 8.5 ≤ TensorRT < 10.2: ``BuilderFlag.REFIT`` (every weight refittable);
- ``strip=True`` (TensorRT ≥ 10.0): ``BuilderFlag.STRIP_PLAN``, a plan without the refittable weights,
  refit from the bundle when ``TrtTaskSession`` loads it.

``trtexec_lines`` gives the equivalent ``trtexec`` commands, to reproduce on the device itself.
TensorRT is not installed on this project's machines: this module is written against TensorRT's
documented Python API and tested only where ``tensorrt`` imports (tests/test_tensorrt.py).
"""

from __future__ import annotations

import json
import os
import shlex

from ..errors import BackendError, FormatError
from ..io import atomic_output
from ..runtime.bundle import Bundle, open_bundle
from ..runtime.session import BASE_ID_KEY, WEIGHTS_KEY
from ..runtime.trt_backend import _trt, parse_version, refit_features


def managed_weights(bundle: Bundle, onnx_path: str) -> list[str]:
    """The float weights of the plain graph that the bundle rewrites per task (metadata-checked)."""
    try:
        import onnx
    except ImportError:
        raise BackendError("reading the ONNX graph needs onnx: pip install 'edgemerge[onnx]'") from None
    model = onnx.load(onnx_path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(BASE_ID_KEY) != bundle.base_id:
        raise FormatError(f"{onnx_path} was not exported from the base model of {bundle.path}; "
                          "export the plain graph with `edgemerge export onnx` from this bundle")
    inits = {i.name for i in model.graph.initializer}
    names = [n for n in json.loads(meta.get(WEIGHTS_KEY, "[]")) if n in inits]
    merged = {p.name for p in bundle.params if p.role == "merged"}
    private = {k for ks in bundle.private_keys.values() for k in ks}
    return [n for n in names if n in merged or n in private]


def trtexec_lines(onnx_path: str, engine_path: str, strip: bool = False, fp16: bool = False) -> list[str]:
    """trtexec commands equivalent to ``build_engine`` (build; build and time one refit).

    >>> trtexec_lines("m.plain.onnx", "m.plan", strip=True)[0]
    'trtexec --onnx=m.plain.onnx --saveEngine=m.plan --refit --stripWeights'
    """
    common = ["--refit"] + (["--stripWeights"] if strip else []) + (["--fp16"] if fp16 else [])
    q = shlex.quote
    return [" ".join(["trtexec", f"--onnx={q(onnx_path)}", f"--saveEngine={q(engine_path)}", *common]),
            " ".join(["trtexec", f"--onnx={q(onnx_path)}", *common, "--timeRefit"])]


def build_engine(bundle: Bundle | str, onnx_path: str, engine_path: str, *, strip: bool = False,
                 fp16: bool = False, workspace_mib: int = 1024) -> dict:
    """Parse ``onnx_path`` (the plain graph), build a refittable engine, write it atomically.

    Returns the plan: TensorRT version, flags set, the weights made refittable and notes.
    """
    bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
    names = managed_weights(bundle, onnx_path)
    trt = _trt()
    version = parse_version(trt.__version__)
    feats = refit_features(version)
    if strip and not feats["strip_plan"]:
        raise BackendError(f"TensorRT {trt.__version__} cannot strip weights from a plan (needs ≥ 10.0); drop --strip")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 8.x needs explicit batch for ONNX; 10.x implies it (and deprecates the flag)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if version < (10,) else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    flags = [feats["flag"]] + (["STRIP_PLAN"] if strip else []) + (["FP16"] if fp16 else [])
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if feats["flag"] == "REFIT_INDIVIDUAL":
        refused = [n for n in names if not network.mark_weights_refittable(n)]
        if refused:
            raise FormatError(f"{onnx_path}: TensorRT has no weights named {', '.join(refused)}; "
                              "were they folded into constants? Re-export the plain graph with `edgemerge export onnx`")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    os.makedirs(os.path.dirname(os.path.abspath(engine_path)), exist_ok=True)
    with atomic_output(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(plan))
    notes = []
    if feats["gemm_bias_bug"]:
        notes.append("TensorRT 11.3 documents that REFIT may drop a GEMM bias: compare outputs with ONNX Runtime")
    return {"tensorrt": trt.__version__, "flags": flags, "refittable": names, "engine": engine_path,
            "bytes": os.path.getsize(engine_path), "notes": notes}
