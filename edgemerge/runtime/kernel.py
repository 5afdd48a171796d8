"""The mask kernel: θ_t = θ0 + m_t ⊙ τ_MTL, defined as a select so it is bit-exact everywhere.

    out[i] = θ0[i] + τ[i]   if bit i of the packed mask is set
    out[i] = θ0[i]          otherwise

computed in float32 and rounded once to θ0's dtype. (A select, not ``θ0 + m·τ``: the product form
turns θ0 = -0.0 into +0.0 where the mask is off, and the C applier and GPU kernels must agree.)
"""

from __future__ import annotations

import numpy as np

from .bits import unpack_bits


def apply_mask_reference(base: np.ndarray, vector: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Plain numpy version of the kernel; the reference every fast path is tested against."""
    mask = unpack_bits(packed, base.size).reshape(base.shape)
    b32 = base.astype(np.float32, copy=False)
    res = np.where(mask, b32 + vector.astype(np.float32, copy=False), b32)
    if out is None:
        return res.astype(base.dtype, copy=False)
    np.copyto(out, res.reshape(out.shape), casting="unsafe")
    return out
