"""Every mask-kernel path equals the reference select, bit for bit."""

import numpy as np
import pytest

import edgemerge.runtime.kernel as kernel
from edgemerge.errors import FormatError
from edgemerge.runtime.dtypes import DTYPES


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, (1 << 20) + 13])
@pytest.mark.parametrize("dtypes", [("F32", "F32"), ("F32", "F16"), ("BF16", "BF16"), ("F16", "F32")])
def test_kernel_paths_match_reference(monkeypatch, fused, n, dtypes):
    if fused:
        pytest.importorskip("numba")
    monkeypatch.setattr(kernel, "_FUSED", None if fused else False)
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n).astype(np.float32)
    base[: min(n, 3)] = -0.0  # the select keeps -0.0 where the bit is off; θ0 + 0·τ would not
    base = base.astype(DTYPES[dtypes[0]])
    vec = rng.standard_normal(n).astype(np.float32).astype(DTYPES[dtypes[1]])
    packed = np.packbits(rng.random(n) < 0.4)
    out = np.empty_like(base)
    kernel.apply_mask(base, vec, packed, out)
    assert out.tobytes() == kernel.apply_mask_reference(base, vec, packed).tobytes()


def test_all_bits_when_no_mask():
    base, vec = np.arange(5, dtype=np.float32), np.full(5, 0.5, np.float32)
    out = np.empty_like(base)
    assert kernel.apply_mask(base, vec, None, out).tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]


def test_bad_arguments():
    base = np.zeros(9, np.float32)
    with pytest.raises(FormatError, match="packed mask has 1 bytes but 9 elements need 2"):
        kernel.apply_mask(base, base, np.zeros(1, np.uint8), np.empty_like(base))
    with pytest.raises(ValueError, match="out must be"):
        kernel.apply_mask(base, base, None, np.empty(9, np.float64))
