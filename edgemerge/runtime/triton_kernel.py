"""The mask kernel as one fused Triton pass on CUDA (imported only when Triton is installed).

Each program handles ``BLOCK`` consecutive elements: it loads θ0 and τ, the mask byte of each
element (neighbouring lanes share a byte; the cache serves it), tests the bit (big bit order) and
stores ``bit ? f32(θ0) + f32(τ) : f32(θ0)`` rounded to the output dtype -- the select of
``kernel.py``, so it is bit-identical to the numpy reference (tested on the GPU, bench/gpu_check.sh).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _select_add(base_ptr, vec_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):  # pragma: no cover - GPU
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    byte = tl.load(mask_ptr + (offs >> 3), mask=ok, other=0).to(tl.int32)
    bit = (byte >> (7 - (offs & 7)).to(tl.int32)) & 1
    b = tl.load(base_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(vec_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(bit != 0, b + v, b).to(out_ptr.dtype.element_ty), mask=ok)


def apply_mask_triton(base, vector, packed, out, block: int = BLOCK) -> None:
    """out = select(bits of ``packed``, base + vector, base) for flat CUDA tensors of ``base.numel()``."""
    n = base.numel()
    if n:
        _select_add[(triton.cdiv(n, block),)](base, vector, packed, out, n, BLOCK=block)
