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
@pytest.mark.parametrize("dtypes", [("F32", "F32"), ("F32", "F16"), ("BF16", "BF16"), ("F16", "F32"), ("F16", "F16"),
                                    ("BF16", "F32")])
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


def _bit_patterns(rng, n, name):
    """Random bit patterns of a float dtype: every exponent, subnormals, ±inf, NaN, -0.0."""
    dt = DTYPES[name]
    raw = rng.integers(0, 1 << (8 * dt.itemsize), n, dtype=np.uint64).astype(f"u{dt.itemsize}")
    return raw.view(dt)


def _scaled(rng, n, name):
    """Values whose sums land near every rounding boundary, overflow and underflow included."""
    with np.errstate(over="ignore"):  # values past float16's range become ±inf on purpose
        return (rng.standard_normal(n) * np.exp2(rng.integers(-30, 17, n))).astype(np.float32).astype(DTYPES[name])


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("pair", [("F16", "F16"), ("F16", "F32"), ("BF16", "BF16"), ("BF16", "F32")])
def test_c_half_kernel_is_the_reference_bit_for_bit(simd, pair):
    """float16 / bfloat16 θ0: round-to-nearest-even, subnormals, overflow to inf, NaN as numpy and
    ml_dtypes give it -- every start/stop and output alignment, SIMD and scalar loops."""
    c = _cmask_or_skip()
    rng = np.random.default_rng(11)
    n = 50_003
    kinds = {"F32": 0, "F16": 1, "BF16": 2}
    c.use_simd(simd)
    try:
        for gen in (_bit_patterns, _scaled):
            base, vec = gen(rng, n, pair[0]), gen(rng, n, pair[1])
            packed = np.packbits(rng.random(n) < 0.5)
            with np.errstate(all="ignore"):
                ref = kernel.apply_mask_reference(base, vec, packed).view(np.uint16)
                # IEEE 754 leaves open which NaN a sum of two NaNs returns; bundles hold no NaN
                both_nan = np.isnan(base.astype(np.float32)) & np.isnan(vec.astype(np.float32))
            raw = np.zeros(n + 8, np.uint16)
            for shift in (0, 1, 3):
                out = raw[shift : shift + n]
                for s, e in [(0, n), (3, n - 5), (13, 14), (8, 200), (100, 100)]:
                    out[:] = 0xABCD
                    c.apply_half(base.view(np.uint16), vec if pair[1] == "F32" else vec.view(np.uint16), packed, out,
                                 s, e, kinds[pair[0]], kinds[pair[1]])
                    ok = (out[s:e] == ref[s:e]) | both_nan[s:e]
                    assert ok.all(), (gen.__name__, shift, s, e, np.flatnonzero(~ok)[:5])
                    assert (out[:s] == 0xABCD).all() and (out[e:] == 0xABCD).all()
    finally:
        c.use_simd(True)


def test_half_pairs_take_the_c_kernel():
    _cmask_or_skip()
    for pair in [("F16", "F16"), ("F16", "F32"), ("BF16", "BF16"), ("BF16", "F32")]:
        assert kernel.kernel_name(DTYPES[pair[0]], DTYPES[pair[1]]) in ("c-avx2", "c-scalar")
    assert kernel.kernel_name(DTYPES["F16"], DTYPES["BF16"]) == "numpy"  # a pair the C kernel does not take
    c = _cmask_or_skip()
    x = np.zeros(16, np.uint16)
    with pytest.raises(ValueError, match="do not match"):
        c.apply_half(x, x, np.zeros(2, np.uint8), x.copy(), 0, 16, 1, 2)  # a bfloat16 vector on a float16 base
