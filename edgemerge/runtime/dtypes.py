"""safetensors dtype names <-> numpy dtypes, as one table (bf16 via ml_dtypes)."""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a small numpy extension; it gives numpy a real bfloat16
    from ml_dtypes import bfloat16 as _bf16
except ImportError:  # pragma: no cover - declared dependency, guard for trimmed device installs
    _bf16 = None

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
if _bf16 is not None:
    DTYPES["BF16"] = np.dtype(_bf16)

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
VECTOR_DTYPES = ("F32", "F16", "BF16")  # what τ_MTL may be stored as


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a safetensors dtype name; KeyError for unknown names."""
    return DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    """safetensors dtype name for a numpy dtype."""
    dtype = np.dtype(dtype)
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise KeyError(f"numpy dtype {dtype} has no safetensors name")
