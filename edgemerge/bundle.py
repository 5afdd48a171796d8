"""Writing bundles (docs/format.md). Reading lives in ``edgemerge.runtime.bundle`` (no torch there).

>>> import numpy as np, tempfile
>>> from edgemerge.runtime import open_bundle
>>> p = tempfile.mkdtemp() + "/tiny.safetensors"
>>> _ = write_bundle(p, tasks={"a": {}}, base={"w": np.ones(3, np.float32)},
...                  vector={"w": np.full(3, 0.5, np.float32)},
...                  masks={"a": {"w": np.array([0b10100000], np.uint8)}})
>>> open_bundle(p).task_weights("a")["w"].tolist()
[1.5, 1.0, 1.5]
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from . import __version__
from .errors import ConfigError, FormatError
from .io import Lazy, TensorLike, write_safetensors
from .runtime.bits import BIT_ORDER, packed_nbytes
from .runtime.bundle import (
    FORMAT_NAME, MANIFEST_KEY, base_name, check_task_name, mask_name, open_bundle,
    private_name, vector_name,
)
from .runtime.dtypes import FLOAT_DTYPES, VECTOR_DTYPES, dtype_name


def _spec(t: TensorLike) -> tuple[str, tuple[int, ...]]:
    return (t.dtype, tuple(t.shape)) if isinstance(t, Lazy) else (dtype_name(t.dtype), tuple(t.shape))


def write_bundle(
    path: str | os.PathLike,
    *,
    tasks: Mapping[str, Mapping[str, Any]],
    base: Mapping[str, TensorLike],
    vector: Mapping[str, TensorLike],
    masks: Mapping[str, Mapping[str, TensorLike]] | None = None,
    private: Mapping[str, Mapping[str, TensorLike]] | None = None,
    vector_dtype: str = "F32",
    aliases: Mapping[str, str] | None = None,
    method: Mapping[str, Any] | None = None,
    mask_info: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Write a bundle in one call and return its manifest.

    ``tasks`` maps task name -> its manifest entry (λ, density, source, …; in bundle order).
    ``base`` holds every parameter of θ0; those that also appear in ``vector`` are *merged*
    (θ_t = θ0 + m_t ⊙ τ_MTL), the rest are *carried* unchanged. ``masks`` (task -> param ->
    packed uint8) must cover every merged param of every task, or be None for "no masks".
    ``aliases`` maps a tied name to the param it is one tensor with (stored once, under that param).
    """
    names = [check_task_name(t) for t in tasks]
    if vector_dtype not in VECTOR_DTYPES:
        raise ConfigError(f"vector dtype {vector_dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
    params, tensors = [], {}
    for p in sorted(base):
        dtype, shape = _spec(base[p])
        tensors[base_name(p)] = base[p]
        role = "merged" if p in vector else "carried"
        params.append({"name": p, "shape": list(shape), "dtype": dtype, "role": role})
        if role == "carried":
            continue
        if dtype not in FLOAT_DTYPES:
            raise FormatError(f"param {p!r}: only float params can be merged, base is {dtype}")
        if _spec(vector[p]) != (vector_dtype, shape):
            raise FormatError(f"vector {p!r} is {_spec(vector[p])}, expected {(vector_dtype, shape)}")
        tensors[vector_name(p)] = vector[p]
        for t in names if masks is not None else ():
            m = masks.get(t, {}).get(p)
            want = ("U8", (packed_nbytes(int(np.prod(shape))),))
            if m is None or _spec(m) != want:
                raise FormatError(f"mask for task {t!r}, param {p!r}: expected packed {want}, got {m if m is None else _spec(m)}")
            tensors[mask_name(t, p)] = m
    extra_vectors = sorted(set(vector) - set(base))
    if extra_vectors:
        raise FormatError(f"vector tensors without a base parameter: {', '.join(extra_vectors)}")
    aliases = dict(aliases or {})
    for a, c in aliases.items():
        if c not in base or a in base:
            raise FormatError(f"alias {a!r} -> {c!r}: the alias must not be a param and its target must be one")
    private = private or {}
    for t, keys in private.items():
        if t not in tasks:
            raise FormatError(f"private tensors given for unknown task {t!r}")
        for k, v in keys.items():
            tensors[private_name(t, k)] = v
    manifest = {
        "format": FORMAT_NAME,
        "format_version": 1,  # v2 (per-task codecs) is written by edgemerge.codecs
        "tool_version": __version__,
        "tasks": [{"name": t, **dict(tasks[t])} for t in names],
        "params": params,
        "private": {t: sorted(private[t]) for t in names if private.get(t)},
        "vector_dtype": vector_dtype,
        "method": dict(method or {}),
        "mask": {"policy": "tall" if masks is not None else "none", "bit_order": BIT_ORDER, **dict(mask_info or {})},
        **({"aliases": dict(sorted(aliases.items()))} if aliases else {}),
        **dict(extra or {}),
    }
    try:  # strict JSON: a bare NaN or Infinity is refused by other readers, so never written
        meta = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)}
    except ValueError as exc:
        raise FormatError(f"{os.fspath(path)}: manifest holds a non-finite number ({exc}); nothing was written") from None
    # the reader's checks are the writer's last check, on the temp file, before it replaces `path`
    write_safetensors(path, tensors, meta, progress=progress, check=lambda tmp: _reads_back(tmp, os.fspath(path)))
    return manifest


def _reads_back(tmp: str, path: str) -> None:
    try:
        open_bundle(tmp).close()
    except FormatError as exc:
        raise FormatError(f"{str(exc).replace(tmp, path)} -- the bundle reader would refuse it, so nothing was written") from None
