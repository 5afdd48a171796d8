"""Format v2's per-task codecs: the encoders, the planes tensor, every kernel path of every rule bit
for bit (−0.0, subnormals, fp16/bf16), the reader's checks, and the CLI. The runtimes (TaskSession,
TorchTaskModel) are checked against a torch forward of θ_t in tests/test_conformance.py
(``test_codec_cell``)."""

import hashlib
import json
import lzma
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import edgemerge.runtime.kernel as kernel
from edgemerge.codecs import Choice, choice_notes, encode_bundle, encode_planes, parse_codec, tswitch_planes
from edgemerge.errors import CheckpointError, ConfigError, FormatError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle
from edgemerge.runtime.bits import pack_bits
from edgemerge.runtime.codecs import Codec, Recipe, apply_sign, decode_planes, quant_rows, rebuild, rebuild_reference
from edgemerge.runtime.dtypes import DTYPES
from safetensors.numpy import load_file, save_file

from conftest import make_suite


def _cmask_or_skip():
    try:
        from edgemerge.runtime import _cmask
    except ImportError:
        pytest.skip("the C kernel was not built (no compiler at install time)")
    return _cmask


def test_tswitch_planes_exact_small_case():
    """The T-Switch step on 8 numbers: top half of the positives, top half (rounded down, at least
    one) of the negatives, signs, and c = ‖kept‖₂ / √count."""
    tau = np.array([0.5, -0.2, 0.1, -0.4, 0.3, 0.0, -0.1, 0.2], np.float32)
    keep, neg, c = tswitch_planes(tau, 0.5)
    assert keep.tolist() == [True, False, False, True, True, False, False, False]
    assert neg[keep].tolist() == [False, True, False]
    want = np.sqrt((np.float64(np.float32(0.5)) ** 2 + np.float64(np.float32(0.4)) ** 2 + np.float64(np.float32(0.3)) ** 2) / 3)
    assert c == np.float32(want)
    keep, _, c = tswitch_planes(np.zeros(5, np.float32), 0.5)
    assert not keep.any() and c == 0


def _values(rng, n, dtype):
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 10, n))).astype(np.float32)
    x[::11] = -0.0
    x[5::13] = np.float32(1e-41)  # float32 subnormals
    with np.errstate(over="ignore"):
        return x.astype(DTYPES[dtype])


@pytest.mark.parametrize("path", ["c-simd", "c-scalar", "numpy"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("n", [1, 9, 1001, (1 << 18) + 13])
def test_apply_sign_paths_match_the_rule(monkeypatch, path, dtype, n):
    c = _cmask_or_skip() if path != "numpy" else None
    monkeypatch.setattr(kernel, "_C", c if c is not None else False)
    rng = np.random.default_rng(n)
    base = _values(rng, n, dtype)
    presence, sign = pack_bits(rng.random(n) < 0.3), pack_bits(rng.random(n) < 0.5)
    for scale in (np.float32(3e-3), np.float32(2e-40), np.float32(7.0)):
        r = Recipe("tswitch", presence=presence, sign=sign, scale=float(scale))
        if c is not None:
            c.use_simd(path == "c-simd")
        try:
            out = rebuild(base, None, r, np.empty_like(base))
        finally:
            if c is not None:
                c.use_simd(True)
        with np.errstate(over="ignore"):
            want = rebuild_reference(base, None, r)
        assert out.tobytes() == want.tobytes()
        off = ~np.unpackbits(presence, count=n).astype(bool)
        assert out[off].tobytes() == base[off].tobytes()  # −0.0 stays −0.0 where the bit is off


def test_apply_sign_any_range_any_alignment():
    c = _cmask_or_skip()
    rng = np.random.default_rng(3)
    n = 203
    base = _values(rng, n, "F32")
    p, s = pack_bits(rng.random(n) < 0.5), pack_bits(rng.random(n) < 0.5)
    ref = rebuild_reference(base, None, Recipe("tswitch", presence=p, sign=s, scale=0.25))
    raw = np.zeros(n + 8, np.float32)
    for shift in (0, 1, 3, 5):
        out = raw[shift : shift + n]
        for lo, hi in [(0, n), (3, n - 5), (13, 14), (8, 200), (100, 100)]:
            out[:] = 9.0
            c.apply_sign(base, p, s, out, lo, hi, 0.25, 0)
            assert out[lo:hi].tobytes() == ref[lo:hi].tobytes(), (shift, lo, hi)
            assert (out[:lo] == 9.0).all() and (out[hi:] == 9.0).all()
    with pytest.raises(ValueError, match="do not match"):
        c.apply_sign(base, p[:-1], s, out, 0, n, 0.25, 0)
    with pytest.raises(FormatError, match="presence plane has 25 bytes, 203 elements need 26"):
        apply_sign(base, p[:-1], s, 0.25, np.empty_like(base))


@pytest.mark.parametrize("kind", ["tall", "tswitch", "delta"])
def test_correction_and_transposed_recipes(kind):
    """A correction adds in float32 after the rule; a transposed recipe rebuilds the transpose."""
    rng = np.random.default_rng(5)
    shape = (7, 13)
    n = 91
    base = rng.standard_normal(shape).astype(DTYPES["BF16"])
    vec = rng.standard_normal(shape).astype(np.float32)
    idx = np.array([0, 4, 50, 90])
    val = np.array([0.5, -0.25, 1e-3, 2.0], np.float32)
    parts = {"tall": dict(presence=pack_bits(rng.random(n) < 0.5)),
             "tswitch": dict(presence=pack_bits(rng.random(n) < 0.5), sign=pack_bits(rng.random(n) < 0.5), scale=0.125),
             "delta": dict(delta=rng.standard_normal(n).astype(np.float16))}[kind]
    r = Recipe(kind, fix_index=idx, fix_value=val, **parts)
    plain = rebuild_reference(base, vec, Recipe(kind, **parts)).reshape(-1)
    got = rebuild(base, vec, r, np.empty_like(base)).reshape(-1)
    want = plain.copy()
    want[idx] = (plain[idx].astype(np.float32) + val).astype(base.dtype)
    assert got.tobytes() == want.tobytes() == rebuild_reference(base, vec, r).reshape(-1).tobytes()
    t = rebuild(np.ascontiguousarray(base.T), np.ascontiguousarray(vec.T), r.transposed(shape), np.empty(shape[::-1], base.dtype))
    assert t.tobytes() == np.ascontiguousarray(got.reshape(shape).T).tobytes()


def test_planes_roundtrip_and_damage():
    rng = np.random.default_rng(2)
    numels = [0, 5, 64, 1003]
    codec = Codec("tswitch", "xz", correction=0)
    per = []
    for n in numels:
        keep = rng.random(n) < 0.2
        per.append({"presence": keep, "signs": rng.random(int(keep.sum())) < 0.5})
    blob = encode_planes(codec, per)
    back = decode_planes("x", codec, blob, numels)
    for d, b, n in zip(per, back, numels):
        assert np.array_equal(np.unpackbits(b["presence"], count=n).astype(bool), d["presence"])
        signs = np.unpackbits(b["sign"], count=n).astype(bool)
        assert np.array_equal(signs[d["presence"]], d["signs"]) and not signs[~d["presence"]].any()
    raw = lzma.decompress(blob.tobytes())
    with pytest.raises(FormatError, match="truncated, has trailing bytes|does not decode"):
        decode_planes("planes/t", codec, blob[:-3], numels)
    bomb = np.frombuffer(lzma.compress(bytes(10_000_000), format=lzma.FORMAT_XZ), np.uint8)  # 10 MB of zeros, ~1.5 kB
    with pytest.raises(FormatError, match="inflates past its planes or codes"):  # refused after ~3 planes' worth, not 10 MB
        decode_planes("planes/t", codec, bomb, numels)
    with pytest.raises(FormatError, match="planes/t: the planes end early"):
        decode_planes("planes/t", Codec("tswitch", "raw"), np.frombuffer(raw[:-1], np.uint8), numels)
    with pytest.raises(FormatError, match="bytes after the last plane"):
        decode_planes("planes/t", Codec("tswitch", "raw"), np.frombuffer(raw + b"\0", np.uint8), numels)
    bad = bytearray(raw)
    bad[0] |= 0x07  # param 1 (5 elements): its presence byte's 3 padding bits
    with pytest.raises(FormatError, match="padding bits set"):
        decode_planes("planes/t", Codec("tswitch", "raw"), np.frombuffer(bytes(bad), np.uint8), numels)


@pytest.fixture
def merged(tmp_path):
    base, tasks = make_suite(tmp_path)
    path = str(tmp_path / "b.safetensors")
    merge(MergeConfig(base, tasks, private=("head.*",)), path)
    return path, tasks, tmp_path


MIX = {"task0": "tswitch:density=0.3,correction=0.01", "task1": "delta:dtype=BF16", "task2": "tall:planes=xz,correction=0.02"}


def test_encode_rebuilds_each_codec_and_keeps_the_rest(merged):
    path, tasks, d = merged
    out = str(d / "v2.safetensors")
    m = encode_bundle(path, tasks, {t: parse_codec(c) for t, c in MIX.items()}, out)
    v1, v2 = open_bundle(path), open_bundle(out, verify=True)
    assert m["format_version"] == 2 and v2.version == 2 and v1.version == 1
    assert [t["codec"]["name"] for t in m["tasks"]] == ["tswitch", "delta", "tall"]
    assert m["tasks"][0]["codec"]["correction"] == round(0.01 * 2592)
    for t in v2.tasks:
        src = load_file(tasks[t])
        w, w1 = v2.task_weights(t), v1.task_weights(t)
        for p in v2.params:
            if p.role == "carried":
                assert w[p.name].tobytes() == w1[p.name].tobytes()
        for k in v2.private_keys[t]:
            assert w[k].tobytes() == w1[k].tobytes() == src[k].tobytes()
    # delta in BF16 is τ_t to 3 significant digits; a tall task keeps its TALL mask bit for bit
    w = v2.task_weights("task1")["enc.0.weight"]
    src = load_file(tasks["task1"])["enc.0.weight"]
    assert np.abs(w - src).max() <= 2 ** -8 * np.abs(src - load_file(str(d / "base.safetensors"))["enc.0.weight"]).max()
    for p in v2.merged:
        assert np.array_equal(v2.mask("task2", p.name) if False else np.unpackbits(v2.tall_presence("task2", p.name)),
                              np.unpackbits(v1.packed_mask("task2", p.name)))
    with pytest.raises(FormatError, match="task 'task0' uses the 'tswitch' codec"):
        v2.packed_mask("task0", "enc.0.weight")
    with pytest.raises(FormatError, match="a TALL mask plus a correction"):
        v2.packed_mask("task2", "enc.0.weight")


def test_bench_names_the_codec_kernel(merged, monkeypatch):
    """`edgemerge bench` names what a switch runs: a v2 bundle's other codecs take the C plan, or
    plain numpy (several times slower) when the C extension is off, which the line must say."""
    from edgemerge.cli import bundle_kernels

    path, tasks, d = merged
    out = str(d / "v2.safetensors")
    encode_bundle(path, tasks, {t: parse_codec(c) for t, c in MIX.items()}, out)
    assert bundle_kernels(open_bundle(path), kernel.kernel_name) == f"{kernel.kernel_name()} (F32)"  # v1: masks only
    monkeypatch.setattr(kernel, "_C", False)  # as without the extension: the C plan is gone
    shown = bundle_kernels(open_bundle(out), kernel.kernel_name)
    assert shown == f"{kernel.kernel_name()} (F32); other codecs: numpy (the C extension is off or not built: several times slower)"
    monkeypatch.setattr(kernel, "_C", None)
    if kernel._cmask() is not None:
        assert bundle_kernels(open_bundle(out), kernel.kernel_name).endswith("; other codecs: C")


def test_a_bundle_without_tall_tasks_stores_no_shared_vector(merged):
    path, tasks, d = merged
    out = str(d / "v2.safetensors")
    encode_bundle(path, tasks, {t: parse_codec("tswitch:density=0.1") for t in tasks}, out)
    b = open_bundle(out)
    assert not b.shared and not any(n.startswith("vector/") for n in b.header.tensors)
    assert set(b.task_weights("task0")) == set(open_bundle(path).task_weights("task0"))
    # the encoder keeps whichever of xz and raw is smaller (xz's ~60-byte frame loses on tiny tensors)
    for t in b.tasks:
        e = b.header.tensors[f"planes/{t}"]
        kept = int(round(b.codecs[t].name == "tswitch" and next(x for x in b.manifest["tasks"] if x["name"] == t)["density"] * 2592))
        assert e.end - e.start <= (2592 + 7 * 3) // 8 + (kept + 7 * 3) // 8 + 3


def test_xz_planes_cost_about_their_entropy():
    """A tswitch task of density 0.1: presence H(0.1) = 0.469 bits + 0.1 sign bits per parameter at
    best; xz stores it in under 0.62 bits (raw planes would cost 1.1)."""
    rng = np.random.default_rng(0)
    n = 400_000
    keep = rng.random(n) < 0.1
    blob = encode_planes(Codec("tswitch", "xz"), [{"presence": keep, "signs": rng.random(int(keep.sum())) < 0.5}])
    assert 8 * blob.size / n < 0.62


def test_v2_golden_bytes(tmp_path):
    """Pins the v2 layout (raw planes: no dependence on the lzma build). Changing it is a format change."""
    base = {"w": np.array([[1.0, -0.0], [2.5, 4.0]], np.float32), "b": np.array([0.5, -1.0, 3.0], np.float32)}
    task = {"w": np.array([[1.25, -0.0], [2.0, 4.0]], np.float32), "b": np.array([0.5, -0.75, 3.0], np.float32)}
    from safetensors.numpy import save_file

    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(task, str(tmp_path / "t.safetensors"))
    merge(MergeConfig(str(tmp_path / "base.safetensors"), {"t": str(tmp_path / "t.safetensors")}, "task_arithmetic"),
          str(tmp_path / "b.safetensors"))
    out = tmp_path / "v2.safetensors"
    encode_bundle(str(tmp_path / "b.safetensors"), {"t": str(tmp_path / "t.safetensors")},
                  {"t": parse_codec("tswitch:density=1,planes=raw,correction=0.2")}, str(out))
    raw = load_file(str(out))
    # per param (b, then w): presence, signs of the present entries, fix plane
    assert raw["planes/t"].tolist() == [0b01000000, 0b00000000, 0b00000000, 0b10100000, 0b01000000, 0b10000000]
    c = np.float32(np.sqrt(np.float64(0.25 ** 2 + 0.5 ** 2) / 2))
    assert raw["scale/t"].tolist() == [0.25, c]
    first = np.float32(1.0) + c  # w[0,0] by the rule, then the one correction entry (the largest error)
    fix = np.float16(np.float32(1.25) - first)
    assert raw["fix/t"].tobytes() == fix.tobytes()
    w = open_bundle(str(out)).task_weights("t")
    assert w["b"].tolist() == [0.5, -0.75, 3.0]  # b: one changed entry, c = its magnitude: exact
    want = np.array([[first + np.float32(fix), -0.0], [np.float32(2.5) - c, 4.0]], np.float32)
    assert w["w"].tobytes() == want.tobytes()
    tensors = {k: v for k, v in json.loads(out.read_bytes()[8 : 8 + int.from_bytes(out.read_bytes()[:8], "little")]).items()
               if k != "__metadata__"}
    assert sorted(tensors) == ["base/b", "base/w", "fix/t", "planes/t", "scale/t"]
    head = out.read_bytes()
    m = json.loads(json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")])["__metadata__"]["edgemerge.manifest"])
    m.pop("tool_version")
    m["base"].pop("file"), m["tasks"][0]["source"].pop("file")
    assert hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16] == GOLDEN_MANIFEST
    data = head[8 + int.from_bytes(head[:8], "little") :]
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_DATA


GOLDEN_MANIFEST = "0cdb8a1406ecdb5b"
GOLDEN_DATA = "731272ae242eb83d"


def test_bad_codec_specs_and_inputs(merged):
    path, tasks, d = merged
    with pytest.raises(ConfigError, match="unknown codec 'tswich'.*valid: tall, tswitch, delta"):
        parse_codec("tswich")
    with pytest.raises(ConfigError, match="codec 'delta' has no parameter 'density'.*valid: bits, codes, correction, dtype, fit, private, qmax"):
        parse_codec("delta:density=0.1")
    for bad, msg in (("tswitch:density=0", "density must be in"), ("tswitch:density=x", "are numbers"),
                     ("tall:correction=1", "correction must be in"), ("tall:planes=zip", "planes must be one of"),
                     ("delta:dtype=F64", "dtype must be one of")):
        with pytest.raises(ConfigError, match=msg):
            parse_codec(bad)
    out = str(d / "v2.safetensors")
    spec = {"task0": parse_codec("tswitch")}
    with pytest.raises(ConfigError, match="task0 need their checkpoint for codec tswitch"):
        encode_bundle(path, {}, spec, out)
    with pytest.raises(ConfigError, match="unknown task\\(s\\) nope"):
        encode_bundle(path, tasks, {"nope": parse_codec("tall")}, out)
    with pytest.raises(CheckpointError, match="is not the checkpoint task 'task0' was merged from"):
        encode_bundle(path, {"task0": tasks["task1"]}, spec, out)
    with pytest.raises(ConfigError, match="is one of the inputs"):
        encode_bundle(path, tasks, spec, path)
    assert not os.path.exists(out)
    encode_bundle(path, tasks, spec, out)
    with pytest.raises(ConfigError, match="already a v2 bundle"):
        encode_bundle(out, tasks, spec, str(d / "again.safetensors"))


def test_reader_checks_v2_manifest(merged, tmp_path):
    from test_format import _rewrite_header

    path, tasks, d = merged
    out = str(d / "v2.safetensors")
    encode_bundle(path, tasks, {"task0": parse_codec("tswitch:correction=0.01")}, out)

    def edit(fn):
        def bump(h):
            m = json.loads(h["__metadata__"]["edgemerge.manifest"])
            fn(m)
            h["__metadata__"]["edgemerge.manifest"] = json.dumps(m)
        p = tmp_path / "edited.safetensors"
        with open(out, "rb") as src, open(p, "wb") as dst:
            dst.write(src.read())
        _rewrite_header(p, bump)
        return str(p)

    cases = [
        (lambda m: m["tasks"][0]["codec"].update(name="zip"), "unknown codec 'zip'; valid: delta, emr, tall, tswitch"),
        (lambda m: m["tasks"][0]["codec"].update(planes="gz"), "plane encoding 'gz' is not one of raw, xz"),
        (lambda m: m["tasks"][0]["codec"].update(correction=3), "tensor 'fix/task0' is F16 \\[26\\], the manifest says F16 \\[3\\]"),
        (lambda m: m["tasks"][0]["codec"].update(correction=-1), "'correction' must be a non-negative integer"),
        (lambda m: m["tasks"][1].update(codec={"name": "delta", "dtype": "F16"}), "tensor 'delta/task1/enc.0.bias' named by the manifest is missing"),
    ]
    for fn, msg in cases:
        with pytest.raises(FormatError, match=msg):
            open_bundle(edit(fn))
    # a v1 file that names codecs is read as v1: the codec keys are a v2 thing
    p = edit(lambda m: m.update(format_version=1))
    with pytest.raises(FormatError, match="tensor 'mask/task0/enc.0.bias' named by the manifest is missing"):
        open_bundle(p)


def test_cli_encode_and_inspect(merged):
    path, tasks, d = merged
    out = str(d / "cli.safetensors")
    args = [sys.executable, "-m", "edgemerge", "encode", path, *(f"--task={t}={p}" for t, p in tasks.items()),
            "--codec", "tswitch:density=0.2", "--codec-for", "task2=delta:dtype=F16", "--codec-for",
            "task1=delta:dtype=I8,qmax=1,codes=xz", "-o", out, "--quiet"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "tswitch" in p.stdout and "delta:dtype=F16" in p.stdout
    p = subprocess.run([sys.executable, "-m", "edgemerge", "inspect", out, "--json"], capture_output=True, text=True, timeout=60)
    s = json.loads(p.stdout)
    assert [t["codec"] for t in s["tasks"]] == ["tswitch", "delta I8 (xz codes)", "delta F16"]
    assert s["tasks"][2]["bits_per_param"] == 16.0 and s["format_version"] == 3  # v3: task1's quantized delta
    bad = subprocess.run([*args[:-9], "--codec", "tswitch:q=1", "-o", str(d / "x.safetensors")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "codec 'tswitch' has no parameter 'q'" in bad.stderr
    assert not os.path.exists(d / "x.safetensors")


def test_quantized_delta_codes_and_rule():
    from edgemerge.codecs import pack_nibbles, quantize_rows
    from edgemerge.runtime.codecs import unpack_nibbles

    q = np.arange(-8, 8, dtype=np.int8)
    odd = np.append(q, np.int8(-3))
    assert pack_nibbles(odd).tolist()[:2] == [0x89, 0xAB] and pack_nibbles(odd)[-1] == 0xD0
    assert np.array_equal(unpack_nibbles(pack_nibbles(odd), odd.size), odd)
    tau = np.array([[0.5, -0.25, 0.125], [0.0, 0.0, 0.0]], np.float32)
    codes, scale = quantize_rows(tau.reshape(-1), tau.shape, 7)
    s0 = np.float32(0.5) / np.float32(7)
    assert scale.tolist() == [s0, 0.0]
    assert codes.tolist() == [7, int(np.rint(np.float32(-0.25) / s0)), 2, 0, 0, 0]  # 1.75 -> 2; a zero row stays 0
    base = np.array([[1.0, -0.0, 2.0], [-0.0, 3.0, 1e-40]], np.float32)
    r = Recipe("delta", delta=codes, qscale=scale, qgrid=(2, 3, 0))
    want = (base.reshape(-1) + codes.astype(np.float32) * np.repeat(scale, 3)).reshape(2, 3)
    got = rebuild(base, None, r, np.empty_like(base))
    assert got.tobytes() == want.tobytes() == rebuild_reference(base, None, r).tobytes()
    assert not np.signbit(got[1, 0])  # the delta rule is an add: −0.0 + 0.0 is +0.0 (IEEE), as docs/format.md says
    t = rebuild(np.ascontiguousarray(base.T), None, r.transposed((2, 3)), np.empty((3, 2), np.float32))
    assert t.tobytes() == np.ascontiguousarray(got.T).tobytes()
    r4 = Recipe("delta", delta=pack_nibbles(codes), qscale=scale, qgrid=(2, 3, 0), packed4=True)  # I4 storage, C-decoded
    assert rebuild(base, None, r4, np.empty_like(base)).tobytes() == got.tobytes() == rebuild_reference(base, None, r4).tobytes()
    assert rebuild(np.ascontiguousarray(base.T), None, r4.transposed((2, 3)), np.empty((3, 2), np.float32)).tobytes() == t.tobytes()


def test_quantized_delta_bundle(merged):
    path, tasks, d = merged
    out = str(d / "q.safetensors")
    encode_bundle(path, tasks, {"task0": parse_codec("delta:dtype=I4,fit=absmax"), "task1": parse_codec("delta:dtype=I8,fit=absmax")}, out)
    b = open_bundle(out, verify=True)
    assert b.header.tensors["delta/task0/enc.0.weight"].dtype == "U8" and b.header.tensors["delta/task0/enc.0.weight"].shape == (480,)
    assert b.version == 3 and b.header.tensors["dscale/task1"].shape == (sum(quant_rows(p.shape) for p in b.merged),)
    assert b._qscales("task1", [p.name for p in b.merged].index("enc.1.weight")).shape == (33,)
    src = {t: load_file(tasks[t]) for t in tasks}
    base = load_file(str(d / "base.safetensors"))
    for t, qmax in (("task0", 7), ("task1", 127)):
        w = b.task_weights(t)["enc.1.weight"]
        tau = src[t]["enc.1.weight"] - base["enc.1.weight"]
        step = np.abs(tau).max(axis=1, keepdims=True) / qmax
        assert (np.abs(w - src[t]["enc.1.weight"]) <= step / 2 + 1e-6).all()


def test_mse_fit_clips_a_long_tail():
    from edgemerge.codecs import quantize_rows

    tau = np.array([10.0] + [3.0] * 8, np.float32)  # qmax 1: absmax s = 10 drops the 3s (error 72); s = 4 keeps them (44)
    codes, scale = quantize_rows(tau, (1, 9), 1, "absmax")
    assert scale.tolist() == [10.0] and codes.tolist() == [1] + [0] * 8
    codes, scale = quantize_rows(tau, (1, 9), 1, "mse")
    assert scale.tolist() == [4.0] and codes.tolist() == [1] * 9
    rng = np.random.default_rng(3)
    t = (rng.standard_t(2, size=(40, 64)) * 1e-3).astype(np.float32)  # heavy tails: mse wins on most rows, never loses
    err = {}
    for fit in ("absmax", "mse"):
        q, s = quantize_rows(t.reshape(-1), t.shape, 7, fit)
        err[fit] = np.square(q.reshape(t.shape) * s[:, None] - t, dtype=np.float64).sum(axis=1)
    assert (err["mse"] <= err["absmax"]).all() and (err["mse"] < err["absmax"]).mean() > 0.5


def test_step_fit_one_step_per_tensor():
    from edgemerge.codecs import quantize_rows

    tau = (np.array([[1, 1, 1, 1], [1, 1, 1, -5]], np.float32) * np.float32(0.25))  # RMS 0.5 exactly
    codes, scale = quantize_rows(tau.reshape(-1), tau.shape, 7, "step", 0.5)
    assert scale.tolist() == [0.25, 0.25] and codes.tolist() == [1, 1, 1, 1, 1, 1, 1, -5]
    codes, scale = quantize_rows(tau.reshape(-1), tau.shape, 3, "step", 0.5)   # qmax still clips
    assert codes.tolist()[-1] == -3 and scale.tolist() == [0.25, 0.25]
    codes, scale = quantize_rows(tau.reshape(-1), tau.shape, 127, "step", 2.0)  # s = 1: 0.25 -> 0, -1.25 -> -1
    assert scale.tolist() == [1.0, 1.0] and codes.tolist() == [0] * 7 + [-1]
    codes, scale = quantize_rows(np.zeros(6, np.float32), (2, 3), 127, "step", 0.5)  # no change: zero codes, zero scales
    assert codes.tolist() == [0] * 6 and scale.tolist() == [0.0, 0.0]


def test_step_fit_bundle(merged):
    path, tasks, d = merged
    out = str(d / "step.safetensors")
    spec = parse_codec("delta:dtype=I8,fit=step,step=0.5,codes=xz")
    assert parse_codec(spec.label()) == spec and spec.label() == "delta:dtype=I8,fit=step,step=0.5,codes=xz"
    encode_bundle(path, tasks, {"task0": spec, "task1": parse_codec("delta:dtype=I4,fit=step,step=2")}, out)
    b, stored = open_bundle(out, verify=True), load_file(out)
    src = {t: load_file(tasks[t]) for t in tasks}
    base = load_file(str(d / "base.safetensors"))
    for t, k in (("task0", 0.5), ("task1", 2.0)):
        for name in ("enc.0.weight", "enc.1.weight"):
            tau = src[t][name] - base[name]
            s = np.float32(k * np.sqrt(np.mean(np.square(tau, dtype=np.float64))))
            assert set(b._qscales(t, [p.name for p in b.merged].index(name)).tolist()) == {s}  # one step for every row
            if t == "task0":  # I8 holds every code here: each weight within half a step of θ_t
                assert (np.abs(b.task_weights(t)[name] - src[t][name]) <= s / 2 * (1 + 1e-5) + 1e-7).all()
    for bad, msg in (("delta:dtype=I8,step=0.5", "step applies to fit=step or codes=lowrank"), ("delta:dtype=I8,fit=step,step=0", "step must be a number > 0"),
                     ("delta:dtype=I8,fit=step,step=nan", "step must be a number > 0"), ("delta:dtype=F16,step=1", "apply to a quantized delta"),
                     ("delta:dtype=I8,fit=step,step=x", "step and bits are numbers")):
        with pytest.raises(ConfigError, match=msg):
            parse_codec(bad)


def test_quantized_codes_xz_at_rest(merged):
    path, tasks, d = merged
    raw, xz = str(d / "codes-raw.safetensors"), str(d / "codes-xz.safetensors")
    specs = {"task0": "delta:dtype=I4,qmax=2", "task1": "delta:dtype=I8,qmax=1,correction=0.01"}
    encode_bundle(path, tasks, {t: parse_codec(s) for t, s in specs.items()}, raw)
    m = encode_bundle(path, tasks, {t: parse_codec(s + ",codes=xz") for t, s in specs.items()}, xz)
    a, b = open_bundle(raw, verify=True), open_bundle(xz, verify=True)
    for t in specs:
        assert b.codecs[t].codes == "xz" and a.codecs[t].codes == "raw"
        assert f"dcodes/{t}" in b.header.tensors and not any(n.startswith(f"delta/{t}/") for n in b.header.tensors)
        entry = next(e for e in m["tasks"] if e["name"] == t)["codec"]
        assert entry["codes"] == "xz" and entry["bits_per_param"] < next(
            e for e in a.manifest["tasks"] if e["name"] == t)["codec"]["bits_per_param"]
        wa, wb = a.task_weights(t), b.task_weights(t)
        assert all(wa[k].tobytes() == wb[k].tobytes() for k in wa)  # the same codes, only stored smaller
    assert b.codecs["task2"].codes == "raw"  # a tall task keeps none
    with pytest.raises(ConfigError, match="qmax must be in \\[1, 7\\]"):
        parse_codec("delta:dtype=I4,qmax=8")
    with pytest.raises(ConfigError, match="apply to a quantized delta"):
        parse_codec("delta:dtype=F16,codes=xz")
    with pytest.raises(ConfigError, match="fit must be one of mse, absmax, step"):
        parse_codec("delta:dtype=I8,fit=max")


def test_damaged_codes_stream_is_refused(merged):
    from edgemerge.codecs import encode_codes
    from edgemerge.runtime.codecs import Codec, decode_codes

    shapes = [(3,), (4,)]
    i4, i8 = Codec("delta", dtype="I4", codes="xz"), Codec("delta", dtype="I8", codes="xz")
    good = [np.array([0x12, 0x30], np.uint8), np.array([0x45, 0x67], np.uint8)]  # I4, the odd param's low nibble 0
    got = decode_codes("w", i4, encode_codes("I4", good), shapes)
    assert [g.tolist() for g in got] == [[0x12, 0x30], [0x45, 0x67]]
    with pytest.raises(FormatError, match="w: the codes of param 0 have padding bits set"):
        decode_codes("w", i4, encode_codes("I4", [np.array([0x12, 0x31], np.uint8), good[1]]), shapes)
    with pytest.raises(FormatError, match="w: the codes hold 3 bytes, the merged params need 4"):
        decode_codes("w", i4, encode_codes("I4", [good[0], good[1][:1]]), shapes)
    with pytest.raises(FormatError, match="w: the xz stream is truncated"):
        decode_codes("w", i4, encode_codes("I4", good)[:-4], shapes)
    with pytest.raises(FormatError, match="inflates past"):  # a longer stream is refused at its bound, not inflated
        decode_codes("w", i8, encode_codes("I8", [np.zeros(1 << 20, np.int8)]), shapes)
    path, tasks, d = merged
    out = str(d / "xz.safetensors")
    encode_bundle(path, tasks, {"task0": parse_codec("delta:dtype=I8,qmax=1,codes=xz")}, out)
    from test_format import _rewrite_header  # noqa: F401  (the reader names the tensor it could not decode)
    blob = bytearray(open(out, "rb").read())
    b = open_bundle(out, verify=False)
    e = b.header.tensors["dcodes/task0"]
    start = 8 + int.from_bytes(blob[:8], "little") + e.start
    blob[start + 20] ^= 0xFF
    b.close()
    bad = str(d / "bad.safetensors")
    open(bad, "wb").write(bytes(blob))
    with pytest.raises(FormatError, match="dcodes/task0"):
        open_bundle(bad, verify=False).task_weights("task0")


def _lowrank_stream(records: list[bytes]) -> np.ndarray:
    return np.frombuffer(lzma.compress(b"".join(records), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), np.uint8)


def test_lowrank_codes_golden_and_exact_at_the_rank_bound():
    """The rule on a 2×4 case worked by hand (clip, a shift with round half up, floor on negatives),
    then at the largest rank with ±128 factors: the float32 product equals the int64 one."""
    from edgemerge.runtime.codecs import LOWRANK_MAX_RANK, lowrank_codes

    a = np.array([[1, 2], [-128, 127]], np.int8)
    b = np.array([[3, -1, 0, 5], [100, 127, -128, 1]], np.int8)
    # d = [[203, 253, -256, 7], [12316, 16257, -16256, -513]]; row 1 shifted by 7 with +64 first
    assert lowrank_codes(np.array([0, 7], np.uint8), a, b).tolist() == [[127, 127, -127, 7], [96, 127, -127, -4]]
    assert lowrank_codes(np.array([7], np.uint8), np.array([[1]], np.int8), np.array([[-64, -65, 64, 63]], np.int8)).tolist() \
        == [[0, -1, 1, 0]]  # −0.5 rounds up to 0, −0.51 down to −1, 0.5 up to 1
    rng = np.random.default_rng(0)
    r = LOWRANK_MAX_RANK
    fa = rng.choice(np.array([-128, 127, -127, 1, 0], np.int8), size=(5, r))
    fb = rng.choice(np.array([-128, 127, -1, 3], np.int8), size=(r, 7))
    fa[0], fb[:, 0] = -128, -128  # d[0, 0] = r·128², the largest product the format allows
    e = rng.integers(0, 25, 5).astype(np.uint8)
    d = fa.astype(np.int64) @ fb.astype(np.int64)
    want = np.clip((d + ((1 << e.astype(np.int64)[:, None]) >> 1)) >> e.astype(np.int64)[:, None], -127, 127)
    assert d[0, 0] == r * 128 * 128 and d[0, 0] < 1 << 24
    assert np.array_equal(lowrank_codes(e, fa, fb), want)


def test_lowrank_codes_bundle_and_budget(merged):
    """codes=lowrank: a valid v2 file whose reader rebuilds the encoder's codes, smaller than the
    same task's raw I8 codes; the budget is what the task stores (its xz stream and scales), met
    from below and nearly filled while ranks are left to add; closer to θ_t with a larger budget;
    small params hold one-step codes (``fit=step`` at the spec's step) and one scale."""
    from edgemerge.codecs import quantize_rows
    from edgemerge.runtime.codecs import decode_lowrank

    path, tasks, d = merged
    fid, ranks = {}, {}
    src, base = load_file(tasks["task0"]), load_file(str(d / "base.safetensors"))
    for bits, step in ((2.0, 0.5), (3.0, 0.5), (6.0, 2.0)):  # above the fixed cost (the bias's codes and scale, each matrix's shift bytes and scale)
        out = str(d / f"lr{bits}.safetensors")
        label = f"delta:dtype=I8,codes=lowrank,bits={bits:g}" + (f",step={step:g}" if step != 0.5 else "")
        assert parse_codec(label).label() == label
        m = encode_bundle(path, tasks, {"task0": parse_codec(label)}, out)
        b = open_bundle(out, verify=True)
        assert b.codecs["task0"].codes == "lowrank" and b.codecs["task0"].describe() == "delta I8 (lowrank codes)"
        assert "dcodes/task0" in b.header.tensors and not any(n.startswith("delta/task0/") for n in b.header.tensors)
        assert b.header.tensors["dscale/task0"].shape == (len(b.merged),)  # v3: one scale per param, in one tensor
        entry = next(e for e in m["tasks"] if e["name"] == "task0")["codec"]
        stored = 8 * sum(t.end - t.start for n, t in b.header.tensors.items() if n in ("dcodes/task0", "dscale/task0"))
        merged_n = sum(p.numel for p in b.merged)
        assert entry["codes"] == "lowrank" and entry["bits_per_param"] <= bits and stored <= bits * merged_n
        fid[bits] = entry["relative_error"]
        records = lzma.decompress(b._view("dcodes/task0").tobytes())
        assert records[0] == 0 and records[1 + 48] == 1  # the bias as codes, the first matrix as factors
        codes = decode_lowrank("x", b._view("dcodes/task0"), [p.shape for p in b.merged])
        pos, ranks[bits] = 0, []
        for i, (p, q) in enumerate(zip(b.merged, codes)):  # every param: one scale for every row; a factored one also one shift
            rows = quant_rows(p.shape)
            kind, rank = records[pos], int.from_bytes(records[pos + 1 : pos + 5], "little")
            assert b._qscales("task0", i).shape == (1,)
            if kind == 1:
                assert rank == 0 or len(set(records[pos + 5 : pos + 5 + rows])) == 1
                ranks[bits].append(rank)
                pos += 5 + (rows + rank * p.numel // rows + rank * rows if rank else 0)
            else:  # the spec's one step for the tensor, exactly as quantize_rows fits it
                tau = src[p.name].astype(np.float32).reshape(-1) - base[p.name].astype(np.float32).reshape(-1)
                want, scale = quantize_rows(tau, p.shape, 127, "step", step)
                assert q.tobytes() == want.tobytes() and b._qscales("task0", i).tobytes() == scale[:1].tobytes()
                pos += 1 + p.numel
        assert pos == len(records)
        if bits == 3.0:  # ranks left to add: the budget is nearly all used (one more component of the cheapest matrix would not fit)
            cheapest = min(8 * (quant_rows(p.shape) + p.numel // quant_rows(p.shape)) for p in b.merged
                           if min(quant_rows(p.shape), p.numel // quant_rows(p.shape)) >= 16)
            assert stored > bits * merged_n - 2 * cheapest, (stored, bits * merged_n)
        for p, q in zip(b.merged, codes):  # the reader's weights are the I8 rule over the decoded codes
            r = b.recipe("task0", p.name)
            assert np.array_equal(r.codes(), q)
            assert b.task_weights("task0")[p.name].tobytes() == rebuild_reference(b.base(p.name), None, r).reshape(p.shape).tobytes()
        b.close()
    assert fid[6.0] < fid[3.0] < fid[2.0] and sum(ranks[2.0]) < sum(ranks[3.0])
    with pytest.raises(ConfigError, match="codes=lowrank quantizes its small params with one step"):
        parse_codec("delta:dtype=I8,codes=lowrank,fit=mse")
    lowrank_kind = [p for p in open_bundle(str(d / "lr6.0.safetensors")).merged if min(p.shape[0], p.numel // p.shape[0]) >= 16]
    assert lowrank_kind, "the test model has no matrix the lowrank records factor"
    with pytest.raises(ConfigError, match="codes=lowrank rebuilds I8 codes: use dtype=I8"):
        parse_codec("delta:dtype=I4,codes=lowrank")
    with pytest.raises(ConfigError, match="bits applies to codes=lowrank"):
        parse_codec("delta:dtype=I8,codes=xz,bits=1")
    with pytest.raises(ConfigError, match="bits must be a number > 0"):
        parse_codec("delta:dtype=I8,codes=lowrank,bits=0")
    with pytest.raises(ConfigError, match="codes must be one of raw, xz, lowrank"):
        parse_codec("delta:dtype=I8,codes=svd")
    assert parse_codec("delta:dtype=I8,codes=lowrank,bits=0.65").label() == "delta:dtype=I8,codes=lowrank,bits=0.65"


def test_lowrank_codes_that_would_not_shrink_are_stored_raw(tmp_path):
    """Where the lowrank stream is no smaller than the raw I8 codes (here uniform τ at a step that
    fills every code), the task keeps raw codes: its one scale per param goes out as a scale per
    row (raw codes hold one per row), the same weights, within half a step of θ_t."""
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((8, 600)).astype(np.float32), "b": rng.standard_normal(700).astype(np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t in ("t0", "t1"):
        save_file({k: v + rng.uniform(-1, 1, v.shape).astype(np.float32) for k, v in base.items()}, str(tmp_path / f"{t}.safetensors"))
        tasks[t] = str(tmp_path / f"{t}.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks), str(tmp_path / "b.safetensors"))
    out = str(tmp_path / "o.safetensors")
    encode_bundle(str(tmp_path / "b.safetensors"), tasks, {"t0": parse_codec("delta:dtype=I8,codes=lowrank,bits=9,step=0.0137")}, out)
    b, src = open_bundle(out, verify=True), load_file(tasks["t0"])
    assert b.codecs["t0"].codes == "raw" and b.header.tensors["dscale/t0"].shape == (1 + 8,)  # b: one row; w: 8
    for i, p in enumerate(b.merged):
        s = b._qscales("t0", i)
        assert len(set(s.tolist())) == 1  # one step for the tensor, repeated per row
        tau = src[p.name].astype(np.float64) - base[p.name]
        inside = np.abs(tau) <= 126.5 * s[0]  # beyond 127 steps the codes clip
        assert inside.mean() > 0.95 and (np.abs(b.task_weights("t0")[p.name] - src[p.name])[inside] <= s[0] / 2 * (1 + 1e-5) + 1e-6).all()
        assert b.task_weights("t0")[p.name].tobytes() == rebuild_reference(b.base(p.name), None, b.recipe("t0", p.name)).reshape(p.shape).tobytes()
        assert np.abs(tau).max() / s[0] > 120  # the step fills the code range: the test is of the fallback, not of easy codes


def test_private_tensors_in_half_dtypes(merged):
    """``private=F16`` / ``BF16`` stores a task's float32 private tensors (its head) in that dtype and
    every reader serves float32(stored): the file says which keys (a v3 file, since a v2 reader would
    ignore the key and serve half floats); raw keeps them as they are; a value beyond F16's range is
    refused, naming the tensor; a damaged record is refused."""
    from edgemerge.runtime.dtypes import DTYPES as RT

    path, tasks, d = merged
    out = str(d / "half.safetensors")
    m = encode_bundle(path, tasks, {"task0": parse_codec("tswitch:density=0.3,private=F16"),
                                    "task1": parse_codec("delta:dtype=F16,private=BF16"), "task2": parse_codec("tall:planes=xz")}, out)
    assert m["format_version"] == 3 and parse_codec("tswitch:density=0.3,private=F16").label() == "tswitch:density=0.3,planes=xz,private=F16"
    codec = {e["name"]: e["codec"] for e in m["tasks"]}
    assert codec["task0"]["private"] == {"dtype": "F16", "keys": ["head.weight"]} and "private" not in codec["task2"]
    b = open_bundle(out, verify=True)
    assert [b.codecs[t].describe() for t in b.tasks] == ["tswitch + F16 private", "delta F16 + BF16 private", "tall"]
    for t, dt in (("task0", "F16"), ("task1", "BF16"), ("task2", None)):
        src, got = load_file(tasks[t]), b.private(t)
        for k in b.private_keys[t]:
            stored = b.header.tensors[f"task/{t}/{k}"].dtype
            assert stored == (dt or "F32") and b.private_dtype(t, k) == "F32" and got[k].dtype == np.float32
            want = src[k] if dt is None else src[k].astype(RT[dt]).astype(np.float32)
            assert got[k].tobytes() == want.tobytes() and b.task_weights(t)[k].tobytes() == want.tobytes()
            if dt:
                assert not np.array_equal(got[k], src[k])  # rounded: the test sees the cast
                assert b.private(t)[k] is got[k] and not got[k].flags.writeable  # cast once, read-only as the file's views
    b.close()
    big = d / "big.safetensors"
    sd = load_file(tasks["task0"])
    sd["head.weight"][1, 2] = 7e4  # beyond float16's 65504
    save_file(sd, str(big))
    v1 = str(d / "big-b.safetensors")
    merge(MergeConfig(str(d / "base.safetensors"), {**tasks, "task0": str(big)}, private=("head.*",)), v1)
    with pytest.raises(CheckpointError, match="task 'task0', private tensor 'head.weight': beyond F16's range; encode it with private=BF16 or raw"):
        encode_bundle(v1, {**tasks, "task0": str(big)}, {"task0": parse_codec("delta:dtype=F16,private=F16")}, str(d / "never.safetensors"))
    assert not os.path.exists(d / "never.safetensors")
    with pytest.raises(ConfigError, match="private must be one of raw, F16, BF16"):
        parse_codec("delta:dtype=F16,private=I8")
    from safetensors import safe_open

    from edgemerge.runtime.bundle import CHECKSUM_KEY, MANIFEST_KEY, _sha256

    def damaged(edit_codec, edit_tensors=lambda t: None):
        with safe_open(out, "np") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        man = json.loads(meta[MANIFEST_KEY])
        edit_codec(man["tasks"][0]["codec"])
        edit_tensors(tensors)
        meta[MANIFEST_KEY] = json.dumps(man)
        meta[CHECKSUM_KEY] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
        to = str(d / "damaged.safetensors")
        save_file(tensors, to, metadata=meta)
        return to

    with pytest.raises(FormatError, match="codec 'private' names keys the task has no private tensor for"):
        open_bundle(damaged(lambda c: c["private"]["keys"].append("head.nothing")))
    with pytest.raises(FormatError, match="codec 'private' must be"):
        open_bundle(damaged(lambda c: c["private"].update(dtype="I8")))
    with pytest.raises(FormatError, match="private tensor 'task/task0/head.weight' is F32, the codec says F16"):
        open_bundle(damaged(lambda c: None, lambda t: t.update({"task/task0/head.weight": t["task/task0/head.weight"].astype(np.float32)})))


def test_v2_per_param_scales_still_read_and_v3_scales_checked(merged):
    """Format v3 holds a quantized delta's scales in one tensor per task; a v2 file (a tensor per
    param) reads to the same weights. In v2 a lowrank param's scale is [1] (broadcast to every row)
    or [rows] (as an earlier encoder wrote them); any other shape, or [1] where codes are not
    lowrank, is refused, and so is a v3 scales tensor of the wrong length."""
    from safetensors import safe_open

    from edgemerge.runtime.bundle import CHECKSUM_KEY, MANIFEST_KEY, _sha256

    path, tasks, d = merged
    out = str(d / "lr.safetensors")
    m = encode_bundle(path, tasks, {"task0": parse_codec("delta:dtype=I8,codes=lowrank,bits=6"),
                                    "task1": parse_codec("delta:dtype=I8")}, out)
    assert m["format_version"] == 3
    b = open_bundle(out)
    want = {t: {k: v.copy() for k, v in b.task_weights(t).items()} for t in ("task0", "task1")}
    one = [p for i, p in enumerate(b.merged) if b._qscales("task0", i).shape == (1,) and quant_rows(p.shape) > 1]
    assert one, "no factored param with several rows"
    counts = {t: [b.codecs[t].qscale_count(p.shape) for p in b.merged] for t in ("task0", "task1")}
    names = [p.name for p in b.merged]
    b.close()

    def rewrite(src, edit, to, version=None):
        with safe_open(src, "np") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors)
        if version is not None:
            man = json.loads(meta[MANIFEST_KEY])
            man["format_version"] = version
            meta[MANIFEST_KEY] = json.dumps(man)
        meta[CHECKSUM_KEY] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
        save_file(tensors, to, metadata=meta)
        return to

    def split(tensors):  # v3 -> v2: dscale/<task> into dscale/<task>/<param>
        for t, c in counts.items():
            whole, at = tensors.pop(f"dscale/{t}"), np.cumsum([0] + c)
            for i, n in enumerate(names):
                tensors[f"dscale/{t}/{n}"] = whole[at[i] : at[i + 1]].copy()

    v2 = rewrite(out, split, str(d / "v2.safetensors"), version=2)
    with open_bundle(v2, verify=True) as b2:
        assert b2.version == 2
        for t in want:
            got = b2.task_weights(t)
            assert all(got[k].tobytes() == v.tobytes() for k, v in want[t].items())
    p = one[0]

    def setter(name, fn):
        def edit(tensors):
            tensors[name] = fn(tensors[name])
        return edit

    rows_file = rewrite(v2, setter(f"dscale/task0/{p.name}", lambda s: np.full(p.shape[0], s[0], np.float32)), str(d / "rows.safetensors"))
    with open_bundle(rows_file, verify=True) as b2:
        got = b2.task_weights("task0")
        assert all(got[k].tobytes() == v.tobytes() for k, v in want["task0"].items())
    bad = rewrite(v2, setter(f"dscale/task0/{p.name}", lambda s: np.full(2, s[0], np.float32)), str(d / "bad.safetensors"))
    with pytest.raises(FormatError, match=rf"dscale/task0/{re.escape(p.name)}' is F32 \[2\], the manifest says F32 \[{p.shape[0]}\]"):
        open_bundle(bad)
    q = next(q for q in b.merged if quant_rows(q.shape) > 1)
    raw = rewrite(v2, setter(f"dscale/task1/{q.name}", lambda s: s[:1].copy()), str(d / "raw1.safetensors"))
    with pytest.raises(FormatError, match=rf"dscale/task1/{re.escape(q.name)}' is F32 \[1\], the manifest says F32 \[{q.shape[0]}\]"):
        open_bundle(raw)
    short = rewrite(out, setter("dscale/task1", lambda s: s[:-1].copy()), str(d / "short.safetensors"))
    n1 = sum(counts["task1"])
    with pytest.raises(FormatError, match=rf"'dscale/task1' is F32 \[{n1 - 1}\], the manifest says F32 \[{n1}\]"):
        open_bundle(short)
    with pytest.raises(FormatError, match="tensor 'dscale/task0' named by the manifest is missing"):  # v2 tensors in a v3 file
        open_bundle(rewrite(v2, lambda t: None, str(d / "mixed.safetensors"), version=3))


def test_damaged_lowrank_stream_is_refused():
    from edgemerge.runtime.codecs import decode_lowrank

    shapes = [(32, 32), (4,)]
    factors = b"\x01" + (2).to_bytes(4, "little") + bytes(32) + bytes(64) + bytes(64)
    tail = b"\x00" + bytes([1, 2, 3, 255])
    got = decode_lowrank("w", _lowrank_stream([factors, tail]), shapes)
    assert got[0].tolist() == [0] * 1024 and got[1].tolist() == [1, 2, 3, -1]
    cases = [([b"\x02" + bytes(1024), tail], "param 0 has lowrank record kind 2"),
             ([b"\x01" + (1024).to_bytes(4, "little"), tail], "param 0 \\(\\[32, 32\\]\\) has rank 1024"),
             ([b"\x01" + (16).to_bytes(4, "little"), tail], "has rank 16: more than 1023, or larger"),  # 16·64 + 36 > 1024
             ([b"\x01" + (1).to_bytes(4, "little") + bytes([25]) + bytes(31 + 64), tail], "row shift above 24"),
             ([factors, tail[:-1]], "end inside the record of param 1"),
             ([factors, tail, b"\x00"], "1 bytes after the last param's record"),
             ([factors[:-1]], "end inside the record of param 0")]
    for records, match in cases:
        with pytest.raises(FormatError, match=match):
            decode_lowrank("w", _lowrank_stream(records), shapes)
    with pytest.raises(FormatError, match="inflates past"):
        decode_lowrank("w", _lowrank_stream([b"\x00" * 4000]), shapes)


def test_raw_i4_padding_nibble_is_checked(tmp_path):
    """An odd-numel I4 param stored raw: its last low nibble is padding; set, the reader refuses
    the task (the xz codes are checked the same way by decode_codes)."""
    rng = np.random.default_rng(2)
    base = {"w": rng.standard_normal((3, 5)).astype(np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t in ("a", "b"):
        save_file({"w": base["w"] + np.float32(0.01) * rng.standard_normal((3, 5)).astype(np.float32)}, str(tmp_path / f"{t}.safetensors"))
        tasks[t] = str(tmp_path / f"{t}.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks), str(tmp_path / "v1.safetensors"))
    good = str(tmp_path / "i4.safetensors")
    encode_bundle(str(tmp_path / "v1.safetensors"), tasks, {"a": parse_codec("delta:dtype=I4")}, good)
    b = open_bundle(good, verify=False)
    e = b.header.tensors["delta/a/w"]
    assert e.shape == (8,) and open_bundle(good).task_weights("a")["w"].shape == (3, 5)
    blob = bytearray(open(good, "rb").read())
    blob[8 + int.from_bytes(blob[:8], "little") + e.end - 1] |= 0x01
    b.close()
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(bytes(blob))
    with pytest.raises(FormatError, match="delta/a/w has its padding nibble set"):
        open_bundle(bad, verify=False).task_weights("a")


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("vdt", ["F16", "BF16"])
def test_c_float32_base_half_delta_is_the_rule(simd, vdt):
    """A delta stored in F16/BF16 over a float32 θ0 (the C kernel's f32h loop): every range, both loops."""
    c = _cmask_or_skip()
    rng = np.random.default_rng(9)
    n = 10_007
    base, vec = _values(rng, n, "F32"), _values(rng, n, vdt)
    packed = np.packbits(rng.random(n) < 0.5)
    ref = kernel.apply_mask_reference(base, vec, packed)
    c.use_simd(simd)
    try:
        for lo, hi in [(0, n), (3, n - 5), (13, 14), (8, 200)]:
            out = np.full(n, 9.0, np.float32)
            c.apply_f32h(base, vec.view(np.uint16), packed, out, lo, hi, {"F16": 1, "BF16": 2}[vdt])
            assert out[lo:hi].tobytes() == ref[lo:hi].tobytes() and (out[:lo] == 9).all() and (out[hi:] == 9).all()
    finally:
        c.use_simd(True)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("path", ["c", "numpy"])
def test_quantized_delta_kernel_paths(monkeypatch, dtype, path):
    """The int8-code kernel (row and column scales, any split) equals the numpy rule bit for bit."""
    monkeypatch.setattr(kernel, "_C", _cmask_or_skip() if path == "c" else False)
    rng = np.random.default_rng(4)
    shape = (601, 517)  # > SPLIT elements, odd: the C kernel runs split across threads
    base = _values(rng, shape[0] * shape[1], dtype).reshape(shape)
    codes = rng.integers(-127, 128, base.size).astype(np.int8)
    scale = (rng.random(shape[0]) * 1e-3).astype(np.float32)
    r = Recipe("delta", delta=codes, qscale=scale, qgrid=(shape[0], shape[1], 0))
    from edgemerge.codecs import pack_nibbles

    c4 = rng.integers(-8, 8, base.size).astype(np.int8)
    r4 = Recipe("delta", delta=pack_nibbles(c4), qscale=scale, qgrid=(shape[0], shape[1], 0), packed4=True)
    with np.errstate(over="ignore"):  # I4 codes, odd element count, threads splitting inside a byte
        assert rebuild(base, None, r4, np.empty_like(base)).tobytes() == rebuild_reference(base, None, r4).tobytes()
    with np.errstate(over="ignore"):
        want = rebuild_reference(base, None, r)
        got = rebuild(base, None, r, np.empty_like(base))
        assert got.tobytes() == want.tobytes()
        t = r.transposed(shape)
        bt = np.ascontiguousarray(base.T)
        assert rebuild(bt, None, t, np.empty_like(bt)).tobytes() == rebuild_reference(bt, None, t).tobytes() \
            == np.ascontiguousarray(want.T).tobytes()


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("nib", [0, 1])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("grid", [(1, 9), (7, 9), (3, 17), (5, 1027), (2, 2600), (40, 64)])
def test_c_quantized_delta_loops_any_row_range_and_alignment(simd, nib, axis, grid):
    """apply_q8 on float32 bases (the AVX2 loop: per-chunk scale runs, streamed stores; and the
    portable loop): rows shorter and longer than a vector and a chunk, every output alignment,
    ranges that start and end inside a row, I4 codes that start inside a byte; −0.0, subnormal,
    infinite and NaN bases. Bit for bit the rule, nothing outside the range written."""
    from edgemerge.codecs import pack_nibbles

    c = _cmask_or_skip()
    rng = np.random.default_rng(sum(grid) + 7 * nib + 3 * axis)
    rows, cols = grid
    n = rows * cols
    base = _values(rng, n, "F32")
    base[1::17], base[2::19] = np.inf, np.nan
    codes = rng.integers(-8 if nib else -127, 8 if nib else 128, n).astype(np.int8)
    codes[::5] = 0
    scale = (rng.random(rows if axis == 0 else cols) * 10.0 ** rng.integers(-40, 2, rows if axis == 0 else cols)).astype(np.float32)
    stored = pack_nibbles(codes) if nib else codes
    r = Recipe("delta", delta=stored, qscale=scale, qgrid=(rows, cols, axis), packed4=bool(nib))
    with np.errstate(over="ignore", invalid="ignore"):
        want = rebuild_reference(base, None, r).reshape(-1)
    raw = np.zeros(n + 16, np.float32)
    c.use_simd(simd)
    try:
        for shift in (0, 1, 3, 7):
            out = raw[shift : shift + n]
            for lo, hi in {(0, n), (1, n - 1), (3, max(3, n - 5)), (cols // 2, n), (0, min(n, 45)), (n // 3, 2 * n // 3 + 1)}:
                out[:] = 9.0
                c.apply_q8(base, stored, scale, out, lo, hi, cols, axis, 0, nib)
                assert out[lo:hi].tobytes() == want[lo:hi].tobytes(), (shift, lo, hi)
                assert (out[:lo] == 9.0).all() and (out[hi:] == 9.0).all()
    finally:
        c.use_simd(True)


def test_selector_picks_the_cheapest_candidate_that_meets_the_target(merged):
    from edgemerge.codecs import choice_notes, select_codecs

    path, tasks, d = merged
    src = {t: load_file(p) for t, p in tasks.items()}

    def score(task, weights):  # a stand-in for validation accuracy: 1 at θ_t, lower the further from it
        err = sum(float(np.abs(np.asarray(weights[k], np.float64) - src[task][k]).sum()) for k in ("enc.0.weight", "enc.1.weight"))
        return 1.0 / (1.0 + err)

    cands = ("tswitch:density=0.1", "tall:planes=raw", "delta:dtype=I8", "delta:dtype=F16")
    for target in (50.0, 99.0):
        got = select_codecs(path, tasks, score, target, str(d / "scratch.safetensors"), candidates=cands)
        for t, c in got.items():
            ok = [(bits, label) for label, bits, norm in c.tried if norm >= target]
            assert c.met and c.spec.label() == parse_codec(min(ok)[1]).label() and c.normalized >= target
            assert [x[0] for x in c.tried] == [parse_codec(x).label() for x in cands]
    strict = select_codecs(path, tasks, score, 100.0, str(d / "scratch.safetensors"), candidates=cands)
    assert all(not c.met and c.spec.label() == "delta:dtype=F16" for c in strict.values())  # F16 is not exact: fallback
    assert not os.path.exists(d / "scratch.safetensors")
    out = str(d / "chosen.safetensors")
    m = encode_bundle(path, tasks, {t: c.spec for t, c in got.items()}, out, notes=choice_notes(got, 99.0))
    assert all(e["codec"]["chosen_by"]["target"] == 99.0 and len(e["codec"]["chosen_by"]["tried"]) == 4 for e in m["tasks"])
    for bad in (0, 100.5, float("nan")):
        with pytest.raises(ConfigError, match="must be a percentage in \\(0, 100\\]"):
            select_codecs(path, tasks, score, bad, str(d / "s.safetensors"))
    for bad, where in ((lambda task, w, seen=[]: seen.append(1) or (1.0 if len(seen) == 1 else float("nan")), "tswitch:density=0.1"),
                       (lambda task, w: None, "its own checkpoint")):  # a score that is not a finite number, as the λ search refuses one
        with pytest.raises(ConfigError, match=f"score for task 'task0' \\({re.escape(where)}.*must be a finite number"):
            select_codecs(path, tasks, bad, 99.0, str(d / "s.safetensors"), candidates=cands)
        assert not os.path.exists(d / "s.safetensors")  # the scratch candidate is gone after the error too


def test_a_codec_that_would_rebuild_infinities_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, np.float32)}, str(tmp_path / "base.safetensors"))
    save_file({"w": np.array([1e5, 0, 1, 0], np.float32)}, str(tmp_path / "t.safetensors"))
    tasks = {"t": str(tmp_path / "t.safetensors")}
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "task_arithmetic"), str(tmp_path / "b.safetensors"))
    out = tmp_path / "v2.safetensors"
    with pytest.raises(CheckpointError, match="tensor 'w': codec delta:dtype=F16 rebuilds non-finite values.*BF16 or F32"):
        encode_bundle(str(tmp_path / "b.safetensors"), tasks, {"t": parse_codec("delta:dtype=F16")}, str(out))
    assert not out.exists()
    encode_bundle(str(tmp_path / "b.safetensors"), tasks, {"t": parse_codec("delta:dtype=BF16")}, str(out))
    assert open_bundle(str(out)).task_weights("t")["w"].tolist() == [99840.0, 0, 1, 0]  # 1e5 to bfloat16's 8 bits


def _plan_items(rng, dtype):
    """One param per rule (tall, mask-less tall, tswitch, F16/F32 delta, I8 row / I4 column grids),
    most with a correction, sized so thread cuts land inside params and inside I4 bytes."""
    from edgemerge.codecs import pack_nibbles

    def fix(n, k):
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        return {"fix_index": idx, "fix_value": rng.standard_normal(k).astype(np.float32)}

    items = []
    for kind, shape in [("tall", (301, 7)), ("tall-all", (13,)), ("tall-ls", (67, 1031)), ("tall-ls-all", (9,)),
                        ("tswitch", (257, 1031)), ("delta16", (1,)),
                        ("delta32", (5, 3)), ("i8", (97, 61)), ("i4", (131, 1021)), ("tswitch", (3,))]:
        n = int(np.prod(shape))
        base = _values(rng, n, dtype).reshape(shape)
        vector = _values(rng, n, "F32").reshape(shape) if dtype == "F32" else _values(rng, n, dtype).reshape(shape)
        planes = lambda: np.packbits(rng.random(n) < 0.3)  # noqa: E731
        f = fix(n, min(n, 5)) if kind != "delta32" else {}
        if kind == "tall":
            r = Recipe("tall", presence=planes(), **f)
        elif kind == "tall-all":
            r = Recipe("tall", **f)
        elif kind.startswith("tall-ls"):  # the vector in another kind than θ0 where the dtype allows
            vector = _values(rng, n, "F16" if dtype == "F32" else "F32").reshape(shape)
            r = Recipe("tall", presence=None if kind.endswith("all") else planes(), scale=float(np.float32(-0.7)), scaled=True, **f)
        elif kind == "tswitch":
            r = Recipe("tswitch", presence=planes(), sign=planes(), scale=float(np.float32(0.0625)), **f)
        elif kind.startswith("delta"):
            r = Recipe("delta", delta=_values(rng, n, "F16" if kind == "delta16" else "F32"), **f)
        else:
            q = rng.integers(-8 if kind == "i4" else -127, 8 if kind == "i4" else 128, n).astype(np.int8)
            rows = shape[0]
            axis = 0 if kind == "i8" else 1
            scales = (rng.random(rows if axis == 0 else shape[1]) * 1e-2).astype(np.float32)
            r = Recipe("delta", delta=pack_nibbles(q) if kind == "i4" else q, qscale=scales, qgrid=(*shape, axis),
                       packed4=kind == "i4", **f)
        items.append((base, vector if kind.startswith("tall") else None, r, np.full(shape, 7, base.dtype)))
    return items


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_switch_plan_is_the_rule(simd, dtype):
    """A plan of every rule, corrections included, run as one call, split by threads (cuts inside
    params) and over arbitrary ranges: each output equals rebuild_reference bit for bit."""
    from edgemerge.runtime.codecs import SwitchPlan

    c = _cmask_or_skip()
    rng = np.random.default_rng(11)
    items = _plan_items(rng, dtype)
    want = [rebuild_reference(b, v, r) for b, v, r, _ in items]
    c.use_simd(simd)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            plan = SwitchPlan(items)
            assert plan.size > kernel.SPLIT
            if simd:  # every param in the one C plan but a float16 delta over bfloat16 (numpy: no C pair)
                assert [(it[0].dtype, it[2].delta.dtype) for it in plan.rest] == \
                    ([(DTYPES["BF16"], np.dtype(np.float16))] if dtype == "BF16" else [])
            plan.run()
            for (b, v, r, out), w in zip(items, want):
                assert out.tobytes() == w.tobytes(), r.kind
            for _, _, _, out in items:
                out.fill(7)
            cuts = sorted({0, plan.size, *rng.integers(0, plan.size, 9).tolist()})
            for s, e in zip(cuts, cuts[1:]):  # any range: a run starts and stops inside params and I4 bytes
                c.run_plan(plan._plan, s, e)
            for item in plan.rest:
                rebuild(*item)
            for (b, v, r, out), w in zip(items, want):
                assert out.tobytes() == w.tobytes(), r.kind
    finally:
        c.use_simd(True)


def test_switch_plan_holds_its_arrays_and_checks_jobs():
    import gc

    from edgemerge.runtime.codecs import SwitchPlan
    from edgemerge.runtime.kernel import OP_SELECT, c_job

    c = _cmask_or_skip()
    rng = np.random.default_rng(5)
    items = _plan_items(rng, "F32")
    want = [rebuild_reference(b, v, r) for b, v, r, _ in items]
    outs = [o for *_, o in items]
    plan = SwitchPlan(items)
    del items
    gc.collect()
    plan.run()  # the plan holds every input buffer: nothing it reads was freed
    assert all(o.tobytes() == w.tobytes() for o, w in zip(outs, want))
    x, m, o = np.ones(16, np.float32), np.zeros(2, np.uint8), np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="job 1: vector or mask size"):
        c.plan([c_job(OP_SELECT, x, x, m, o), c_job(OP_SELECT, x, x, m[:1], o)])
    with pytest.raises(ValueError, match="job 0: correction positions are not increasing"):
        c.plan([c_job(OP_SELECT, x, x, m, o, fix=(np.array([3, 3]), np.zeros(2, np.float32)))])
    with pytest.raises(ValueError, match="job 0: correction positions are not increasing"):
        c.plan([c_job(OP_SELECT, x, x, m, o, fix=(np.array([16]), np.zeros(1, np.float32)))])
    with pytest.raises(TypeError):
        c.plan([c_job(OP_SELECT, x, x, m, bytes(64))])  # a read-only output
    e = np.zeros(0, np.float32)  # an empty param (cols 0) runs nothing and does not divide by its cols
    c.apply_q8(e, np.zeros(0, np.int8), e, e.copy(), 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="outside the plan"):
        c.run_plan(c.plan([c_job(OP_SELECT, x, x, m, o)]), 0, 17)
    with pytest.raises(ValueError, match="out must be a C-contiguous"):  # a strided output would lose the writes
        SwitchPlan([(x.reshape(4, 4), None, Recipe("tswitch", presence=m, sign=m, scale=1.0), np.zeros((4, 8), np.float32)[:, ::2])])


def _fidelity(bundle_path, task, ckpt_path, base_path):
    """100 (1 − ‖θ̂_t − θ_t‖² / ‖θ_t − θ0‖²) over the merged params, straight from the files."""
    ckpt, base = load_file(ckpt_path), load_file(base_path)
    with open_bundle(bundle_path) as b:
        w = b.task_weights(task)
        names = [p.name for p in b.merged]
    err = sum(float(np.sum((w[k].astype(np.float64) - ckpt[k]) ** 2)) for k in names)
    ref = sum(float(np.sum((ckpt[k].astype(np.float64) - base[k]) ** 2)) for k in names)
    return 100 * (1 - err / ref)


def test_cli_merge_to_a_target_picks_the_cheapest_codec_that_keeps_it(tmp_path):
    """`edgemerge merge --target`: per task the cheapest candidate whose rebuilt weights keep the
    target's share of τ_t's energy, checked against every candidate encoded on its own."""
    base, tasks = make_suite(tmp_path, n_tasks=2, scale=0.01)
    cands = ["tswitch:density=0.3", "delta:dtype=I4", "delta:dtype=I8"]
    out = str(tmp_path / "out.safetensors")
    task_args = [f"--task={t}={p}" for t, p in tasks.items()]
    cmd = [sys.executable, "-m", "edgemerge"]
    p = subprocess.run([*cmd, "merge", base, *task_args, "--method", "task_arithmetic", "--private", "head.*", "--target", "98",
                        *(f"--candidate={c}" for c in cands), "-o", out, "--quiet", "--json"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the v1 bundle and candidates are gone
    report = json.loads(p.stdout)
    assert report["path"] == out and report["bundle_bytes"] == os.path.getsize(out)
    v1 = str(tmp_path / "v1.safetensors")
    merge(MergeConfig(base=base, tasks=tasks, method="task_arithmetic", private=("head.*",)), v1)
    fid = {}
    for c in cands:  # each candidate on its own, through the other CLI command
        f = str(tmp_path / f"{c.replace(':', '_')}.safetensors")
        q = subprocess.run([*cmd, "encode", v1, *task_args, "--codec", c, "-o", f, "--quiet"], capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stderr
        fid[c] = {t: _fidelity(f, t, tasks[t], base) for t in tasks}
    with open_bundle(out) as b:
        entries = {t["name"]: t["codec"] for t in b.manifest["tasks"]}
    for t in tasks:
        want = next(c for c in cands if fid[c][t] >= 98)  # the list is cheapest first here
        got = entries[t]
        assert parse_codec(want).label() == parse_codec(f"{got['name']}:" + ",".join(
            f"{k}={got[k]}" for k in ("planes", "dtype") if k in got)).label()
        assert got["chosen_by"]["criterion"] == "weight fidelity" and got["chosen_by"]["met"]
        assert got["chosen_by"]["score"] == pytest.approx(fid[want][t], abs=1e-3)
        assert _fidelity(out, t, tasks[t], base) == pytest.approx(fid[want][t], abs=1e-6)
    assert fid["tswitch:density=0.3"]["task0"] < 98  # the proxy is strict: a sparse sign code keeps far less energy
    for bad, msg in ((["--target", "0"], "must be a percentage in (0, 100]"),
                     (["--target", "99", "--candidate", "tswitch:q=1"], "codec 'tswitch' has no parameter 'q'"),
                     (["--target", "99", "--codec", "tswitch"], "--target chooses every task's codec")):
        x = str(tmp_path / "x.safetensors")
        r = subprocess.run([*cmd, "encode", v1, *task_args, *bad, "-o", x, "--quiet"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert not os.path.exists(x)


def test_a_target_no_candidate_keeps_falls_back_scored(tmp_path):
    """A candidate list without the fallback, at a target none of them keeps: the task is written
    with delta F16 and its manifest records the fallback's own measured score (it is scored with the
    candidates), where the fallback used to go unscored and a NaN in the manifest crashed the write."""
    base, tasks = make_suite(tmp_path, n_tasks=2, scale=0.01)
    v1 = str(tmp_path / "v1.safetensors")
    merge(MergeConfig(base=base, tasks=tasks, method="task_arithmetic", private=("head.*",)), v1)
    out = str(tmp_path / "out.safetensors")
    cmd = [sys.executable, "-m", "edgemerge", "encode", v1, *(f"--task={t}={p}" for t, p in tasks.items()),
           "--target", "100", "--candidate", "tswitch:density=0.05", "-o", out, "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with open_bundle(out) as b:
        for t in b.manifest["tasks"]:
            c, why = t["codec"], t["codec"]["chosen_by"]
            assert (c["name"], c["dtype"], why["met"]) == ("delta", "F16", False)
            assert [x["codec"] for x in why["tried"]] == ["tswitch:density=0.05,planes=xz", "delta:dtype=F16"]
            assert why["score"] == why["tried"][1]["normalized"] == pytest.approx(_fidelity(out, t["name"], tasks[t["name"]], base), abs=1e-3)
            assert why["tried"][0]["normalized"] < why["score"] <= 100  # F16 rounds τ: at most 100 to three places, met False
    nan = choice_notes({"a": Choice("a", parse_codec("delta:dtype=F16"), 16.0, float("nan"), False, [("tswitch:density=0.1", 0.5, 91.0)])}, 99.0)
    assert nan["a"]["chosen_by"]["score"] is None and json.dumps(nan, allow_nan=False)


def test_tall_with_a_least_squares_scale(merged):
    """tall:scale=ls stores per tensor s = <m⊙τ_MTL, τ_t> / ‖m⊙τ_MTL‖² (float64 fit, float32 value)
    and rebuilds m ? θ0 + f32(s·τ_MTL) : θ0; per tensor it is never further from θ_t than plain tall."""
    path, tasks, d = merged
    out = str(d / "ls.safetensors")
    m = encode_bundle(path, tasks, {t: parse_codec("tall:planes=raw,scale=ls") for t in tasks}, out)
    assert [t["codec"]["scale"] for t in m["tasks"]] == ["ls"] * 3 and m["format_version"] == 2
    raw, base = load_file(out), load_file(str(d / "base.safetensors"))
    v1, v2 = open_bundle(path), open_bundle(out, verify=True)
    for t in tasks:
        src = load_file(tasks[t])
        w, w1 = v2.task_weights(t), v1.task_weights(t)
        assert raw[f"scale/{t}"].dtype == np.float32 and raw[f"scale/{t}"].shape == (len(v2.merged),)
        for j, p in enumerate(v2.merged):
            on = np.unpackbits(raw[f"mask/{t}/{p.name}"], count=p.numel).astype(bool)
            v = raw[f"vector/{p.name}"].reshape(-1)
            mv = np.where(on, v.astype(np.float64), 0.0)
            tau = (src[p.name].astype(np.float32) - base[p.name]).reshape(-1).astype(np.float64)
            s = np.float32(mv @ tau / (mv @ mv))
            assert raw[f"scale/{t}"][j] == s
            b = base[p.name].reshape(-1)
            want = np.where(on, b + s * v, b).reshape(p.shape)
            assert w[p.name].tobytes() == want.tobytes()
            err = lambda x: float(np.sum((x.astype(np.float64) - src[p.name]) ** 2))  # noqa: E731
            assert err(w[p.name]) <= err(w1[p.name]) * (1 + 1e-6)
    with pytest.raises(FormatError, match="a TALL mask plus a scale"):
        v2.packed_mask("task0", "enc.0.weight")
    with pytest.raises(ConfigError, match="scale must be one of none, ls"):
        parse_codec("tall:scale=l2")
    with pytest.raises(ConfigError, match="codec 'tswitch' has no parameter 'scale'"):
        parse_codec("tswitch:scale=ls")


def test_emr_elect_mask_rescale_exact(tmp_path):
    """EMR on numbers small enough to follow by hand, as the paper's reference code computes them:
    σ = sign of Σ_t τ_t (0 counts as −), m_t = τ_t·σ > 0, u = σ·max_t |m_t ⊙ τ_t|, λ_t =
    Σ_p mean|τ_t| / Σ_p mean|m_t ⊙ u|; rebuilt m_t ? θ0 + f32(λ_t·u) : θ0."""
    from safetensors.numpy import save_file

    base = {"w": np.zeros(4, np.float32), "v": np.array([1.0, 2.0], np.float32)}
    taus = {"a": {"w": [0.5, -0.25, 0.0, 0.125], "v": [1.0, -1.0]},
            "b": {"w": [0.25, 0.5, -0.5, -0.5], "v": [0.5, 0.25]},
            "c": {"w": [-0.125, -0.5, 0.0, 0.25], "v": [-0.25, -0.5]}}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t, tau in taus.items():
        save_file({k: base[k] + np.array(v, np.float32) for k, v in tau.items()}, str(tmp_path / f"{t}.safetensors"))
        tasks[t] = str(tmp_path / f"{t}.safetensors")
    v1 = str(tmp_path / "v1.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, method="task_arithmetic"), v1)
    out = str(tmp_path / "emr.safetensors")
    encode_bundle(v1, tasks, {"a": parse_codec("emr:planes=raw"), "b": parse_codec("emr:planes=raw")}, out)
    # by hand: w: Σ = [0.625, -0.25, -0.5, -0.125] -> σ = [+, -, -, -]; v: Σ = [1.25, -1.25] -> σ = [+, -]
    want_u = {"w": [0.5, -0.5, -0.5, -0.5], "v": [1.0, -1.0]}
    want_m = {"a": {"w": [1, 1, 0, 0], "v": [1, 1]}, "b": {"w": [1, 0, 1, 1], "v": [1, 0]}}
    lam = {t: (np.abs(taus[t]["w"]).mean() + np.abs(taus[t]["v"]).mean())
           / (np.abs(np.multiply(want_m[t]["w"], want_u["w"])).mean() + np.abs(np.multiply(want_m[t]["v"], want_u["v"])).mean())
           for t in want_m}
    assert lam["a"] == pytest.approx((0.21875 + 1.0) / (0.25 + 1.0)) and lam["b"] == pytest.approx((0.4375 + 0.375) / (0.375 + 0.5))
    raw = load_file(out)
    with open_bundle(out, verify=True) as b:
        names = [p.name for p in b.merged]
        assert b.codecs["a"].name == "emr" and b.codecs["c"].name == "tall" and b.shared and b.elected
        for k in names:
            assert raw[f"elected/{k}"].tolist() == want_u[k]
        for t in want_m:
            assert raw[f"scale/{t}"].tolist() == [np.float32(lam[t])] * len(names)
            w = b.task_weights(t)
            for k in names:
                want = np.where(np.array(want_m[t][k], bool), base[k] + np.float32(lam[t]) * np.array(want_u[k], np.float32), base[k])
                assert w[k].tobytes() == want.astype(np.float32).tobytes(), (t, k)
    with pytest.raises(ConfigError, match="elects its vector from every task: pass the checkpoints of c"):
        encode_bundle(v1, {t: tasks[t] for t in ("a", "b")}, {"a": parse_codec("emr")}, str(tmp_path / "x.safetensors"))


def test_frontier_plot_colours_each_codec_apart(tmp_path):
    """The frontier plot groups points by codec: EMR and the lowrank delta codes each get their own
    colour (EMR once shared the selector's red), and the plot is a real PNG."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier_bench", os.path.join(os.path.dirname(__file__), "..", "bench", "frontier_bench.py"))
    fb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fb)
    labels = ["tswitch:density=0.1", "tall:planes=xz", "emr:planes=xz", "delta:dtype=I8,codes=lowrank,bits=1",
              "delta:dtype=I4,codes=xz", "select --target 99.5"]
    assert [fb.family(x) for x in labels] == ["tswitch", "tall", "emr", "lowrank", "delta", "select"]
    assert len({c for _, c in fb.FAMILIES}) == len(fb.FAMILIES)
    out = tmp_path / "frontier.png"
    fb.plot({"text": [(x, 0.5 + i, 90.0 + i) for i, x in enumerate(labels)]}, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
