"""Every mask-kernel path equals the reference select, bit for bit."""

import numpy as np
import pytest

import edgemerge.runtime.kernel as kernel
from edgemerge.errors import FormatError
from edgemerge.runtime.dtypes import DTYPES


def _cmask_or_skip():
    try:
        from edgemerge.runtime import _cmask
    except ImportError:
        pytest.skip("the C kernel was not built (no compiler at install time)")
    return _cmask


@pytest.mark.parametrize("path", ["c", "numba", "numpy"])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, (1 << 20) + 13])
@pytest.mark.parametrize("dtypes", [("F32", "F32"), ("F32", "F16"), ("BF16", "BF16"), ("F16", "F32")])
def test_kernel_paths_match_reference(monkeypatch, path, n, dtypes):
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(kernel, "_C", _cmask_or_skip() if path == "c" else False)
    monkeypatch.setattr(kernel, "_FUSED", None if path == "numba" else False)
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


def test_c_kernel_any_range_any_alignment():
    """Every start/stop (mask bytes split anywhere) and output misaligned for the AVX2 stores."""
    c = _cmask_or_skip()
    rng = np.random.default_rng(7)
    n = 203
    base = rng.standard_normal(n).astype(np.float32)
    base[::17] = -0.0
    vec = rng.standard_normal(n).astype(np.float32)
    packed = np.packbits(rng.random(n) < 0.5)
    ref = kernel.apply_mask_reference(base, vec, packed)
    raw = np.zeros(n + 8, np.float32)
    for shift in range(8):  # out at every 4-byte offset from a 32-byte boundary
        out = raw[shift : shift + n]
        for s, e in [(0, n), (1, n), (3, 150), (8, 200), (13, 14), (40, 40), (5, 64), (0, 16), (100, n)]:
            out[:] = np.nan
            c.apply_f32(base, vec, packed, out, s, e)
            assert out[s:e].tobytes() == ref[s:e].tobytes(), (shift, s, e)
            assert np.isnan(out[:s]).all() and np.isnan(out[e:]).all()
    assert c.simd() in ("avx2+stream", "scalar")


def test_c_kernel_refuses_mismatched_buffers():
    c = _cmask_or_skip()
    x = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="do not match"):
        c.apply_f32(x, x, np.zeros(1, np.uint8), x.copy(), 0, 16)
    with pytest.raises(ValueError, match="do not match"):
        c.apply_f32(x, x, np.zeros(2, np.uint8), x.copy(), 0, 17)
    with pytest.raises(TypeError):
        c.apply_f32(x, x, np.zeros(2, np.uint8), bytes(64), 0, 16)  # read-only output


def test_large_arrays_split_across_threads_match(monkeypatch):
    c = _cmask_or_skip()
    monkeypatch.setattr(kernel, "_C", c)
    monkeypatch.setattr(kernel, "SPLIT", 1000)
    monkeypatch.setattr(kernel.os, "cpu_count", lambda: 3)  # 3 uneven slices, cuts inside mask bytes
    base, vec = np.random.default_rng(3).standard_normal((2, 100_003)).astype(np.float32)
    packed = np.packbits(np.random.default_rng(4).random(100_003) < 0.3)
    out = np.empty_like(base)
    kernel.apply_mask(base, vec, packed, out)
    assert out.tobytes() == kernel.apply_mask_reference(base, vec, packed).tobytes()
