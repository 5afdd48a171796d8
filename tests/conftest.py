"""Shared fixtures: small real checkpoints written to disk as safetensors and torch files."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file


def make_suite(directory, n_tasks=3, seed=0, scale=0.01, head=True, dtype=np.float32):
    """θ0 and n fine-tuned variants of a small MLP-shaped state dict (+ per-task heads)."""
    rng = np.random.default_rng(seed)
    base = {
        "enc.0.weight": rng.standard_normal((48, 20)).astype(dtype),
        "enc.0.bias": rng.standard_normal(48).astype(dtype),
        "enc.1.weight": rng.standard_normal((33, 48)).astype(dtype),
        "norm.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    base_path = directory / "base.safetensors"
    save_file(base, str(base_path))
    tasks = {}
    for t in range(n_tasks):
        sd = {k: (v + (scale * rng.standard_normal(v.shape)).astype(v.dtype)) if v.dtype.kind == "f" else v
              for k, v in base.items()}
        if head:
            sd["head.weight"] = rng.standard_normal((t + 2, 33)).astype(np.float32)
        p = directory / f"task{t}.safetensors"
        save_file(sd, str(p))
        tasks[f"task{t}"] = str(p)
    return str(base_path), tasks


@pytest.fixture
def suite(tmp_path):
    return make_suite(tmp_path)
