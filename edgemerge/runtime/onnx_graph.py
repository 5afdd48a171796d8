"""Tiny helpers that read an ONNX file's initializer table (needs the ``onnx`` package)."""

from __future__ import annotations

from ..errors import BackendError

ONNX_TO_ST = {1: "F32", 10: "F16", 16: "BF16", 11: "F64", 7: "I64", 6: "I32", 5: "I16", 3: "I8", 2: "U8", 9: "BOOL"}


def initializer_specs(path: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every initializer, without loading external data."""
    try:
        import onnx
    except ImportError:
        raise BackendError("reading ONNX initializers needs onnx: pip install 'edgemerge[onnx]'") from None
    model = onnx.load(path, load_external_data=False)
    return {i.name: (ONNX_TO_ST.get(i.data_type, str(i.data_type)), list(i.dims)) for i in model.graph.initializer}
