"""What a bundle holds and what it saves: the data behind ``edgemerge inspect``."""

from __future__ import annotations

import os
from typing import Any

from .runtime.bundle import Bundle
from .runtime.dtypes import DTYPES, FLOAT_DTYPES

PER_TASK = ("mask", "planes", "scale", "delta", "dcodes", "dscale", "fix")  # a task's own codec data
SECTIONS = ("base", "vector", "elected", *PER_TASK, "task")  # every tensor kind a bundle the reader accepts holds


def codec_bytes(bundle: Bundle) -> dict[str, int]:
    """Bytes of each task's own codec data (TALL masks, planes, scales, δ, fixes; not its head)."""
    own = dict.fromkeys(bundle.tasks, 0)
    for name, e in bundle.header.tensors.items():
        kind, _, rest = name.partition("/")
        if kind in PER_TASK:
            own[rest.split("/", 1)[0]] += e.end - e.start
    return own


def bits_per_param_per_task(bundle: Bundle) -> float:
    """Bundle bytes beyond θ0 (header, τ_MTL, codec data, heads) ÷ merged parameters ÷ tasks."""
    base = sum(e.end - e.start for name, e in bundle.header.tensors.items() if name.startswith("base/"))
    merged = sum(p.numel for p in bundle.merged)
    return (os.path.getsize(bundle.path) - base) * 8 / merged / len(bundle.tasks) if merged else 0.0


def summarize(bundle: Bundle) -> dict[str, Any]:
    """Tasks (codec, λ_t, density, bits per merged param of its own tensors), bytes per section,
    bits per param per task beyond θ0 (shared vector included), and storage vs N separate checkpoints.

    "Separate" is what the user would ship without edgemerge: per task, every parameter of θ_t
    in the source dtype (and in fp32) plus that task's private tensors.
    """
    h = bundle.header
    sections = dict.fromkeys(SECTIONS, 0)
    for name, e in h.tensors.items():
        sections[name.split("/", 1)[0]] += e.end - e.start
    file_bytes = os.path.getsize(bundle.path)
    shared_src = sum(p.numel * DTYPES[p.dtype].itemsize for p in bundle.params)
    shared_f32 = sum(p.numel * (4 if p.dtype in FLOAT_DTYPES else DTYPES[p.dtype].itemsize) for p in bundle.params)
    private = {t: sum(h.tensors[f"task/{t}/{k}"].end - h.tensors[f"task/{t}/{k}"].start for k in keys)
               for t, keys in bundle.private_keys.items()}
    n = len(bundle.tasks)
    separate_src = n * shared_src + sum(private.values())
    separate_f32 = n * shared_f32 + sum(private.values())
    m = bundle.manifest
    merged = sum(p.numel for p in bundle.merged)
    own = codec_bytes(bundle)
    return {
        "path": bundle.path,
        "format_version": m["format_version"],
        "tool_version": m.get("tool_version"),
        "method": m["method"],
        "mask": m["mask"],
        "vector_dtype": bundle.vector_dtype,
        "n_params": sum(p.numel for p in bundle.params if p.role == "merged"),
        "tasks": [{**{k: t.get(k) for k in ("name", "lambda", "density", "recon_error")},
                   "codec": bundle.codecs[t["name"]].describe(),
                   "bits_per_param": own[t["name"]] * 8 / merged if merged else 0.0} for t in m["tasks"]],
        "bits_per_param_per_task": bits_per_param_per_task(bundle),
        "sections": {**sections, "header": h.data_start},
        "bundle_bytes": file_bytes,
        "separate_bytes_source_dtype": separate_src,
        "separate_bytes_fp32": separate_f32,
        "ratio_vs_source_dtype": file_bytes / separate_src if separate_src else float("nan"),
        "ratio_vs_fp32": file_bytes / separate_f32 if separate_f32 else float("nan"),
        "base_id": bundle.base_id,
        "aliases": dict(bundle.aliases),
        "statistics": m.get("options", {}).get("statistics"),
    }
