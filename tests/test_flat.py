"""Flat image: numpy reference vs the bundle, and the C applier (ASan + UBSan) vs numpy, bit for bit."""

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgemerge.errors import FormatError
from edgemerge.export.flat import ENTRY, HEADER, read_flat, rebuild, write_flat
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle

from conftest import make_suite

C_SOURCE = os.path.join(os.path.dirname(__file__), "..", "edgemerge", "devices", "c", "emflat.c")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("flat")
    base, tasks = make_suite(d)
    merge(MergeConfig(base, tasks, "ties", private=("head.*",)), d / "b.safetensors")
    return open_bundle(d / "b.safetensors")


@pytest.fixture(scope="module")
def applier(tmp_path_factory):
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on this machine")
    exe = str(tmp_path_factory.mktemp("cc") / "emflat_apply")
    flags = ["-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-fno-omit-frame-pointer",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    subprocess.run([cc, *flags, "-o", exe, C_SOURCE], check=True, capture_output=True)
    return exe


def run_c(exe, image, task, out):
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run([exe, str(image), task, str(out)], capture_output=True, text=True, env=env, timeout=60)


def test_f32_image_rebuilds_bundle_weights_exactly(bundle, tmp_path):
    write_flat(bundle, tmp_path / "img.bin", "F32")
    for t in bundle.tasks:
        got = rebuild(str(tmp_path / "img.bin"), t)
        ref = bundle.task_weights(t)
        assert sorted(got) == sorted(p.name for p in bundle.params if p.role == "merged")
        for k, v in got.items():
            assert v.tobytes() == ref[k].reshape(-1).tobytes(), (t, k)


@pytest.mark.parametrize("encoding, align", [("F32", 64), ("F16", 64), ("Q16", 4096)])
def test_c_applier_matches_numpy_bit_for_bit(bundle, applier, tmp_path, encoding, align):
    img = tmp_path / "img.bin"
    errors = write_flat(bundle, img, encoding, align)
    tasks, entries, _ = read_flat(str(img))
    assert all(e.offset % align == 0 for e in entries)
    if encoding == "Q16":  # error reported per tensor; 16-bit fixed point of N(0,1) weights: < 2^-11
        assert 0 < max(e["max_abs"] for e in errors.values()) < 2 ** -11
    for t in tasks:
        p = run_c(applier, img, t, tmp_path / "out.bin")
        assert p.returncode == 0, p.stderr
        ref = np.concatenate([v.reshape(-1) for v in rebuild(str(img), t).values()])
        assert (tmp_path / "out.bin").read_bytes() == ref.astype("<f4").tobytes(), (encoding, t)


def _corrupt(data: bytes, how: str) -> bytes:
    b = bytearray(data)
    first = HEADER.size  # the first table entry
    if how == "truncated":
        return bytes(b[: len(b) - 100])
    if how == "magic":
        b[0] ^= 0xFF
    elif how == "offset_outside":
        struct.pack_into("<Q", b, first + 16, len(b) + 64 * 1000)
    elif how == "misaligned":
        struct.pack_into("<Q", b, first + 16, struct.unpack_from("<Q", b, first + 16)[0] + 4)
    elif how == "count":
        struct.pack_into("<Q", b, first + 32, struct.unpack_from("<Q", b, first + 32)[0] + 1)
    elif how == "huge_count":
        struct.pack_into("<Q", b, first + 32, 1 << 62)
        struct.pack_into("<I", b, first + 56, 1 << 31)
    elif how == "overlap":
        second = first + ENTRY.size
        struct.pack_into("<Q", b, second + 16, struct.unpack_from("<Q", b, first + 16)[0])
    elif how == "n_tensors":
        struct.pack_into("<I", b, 20, 0xFFFFFFFF)
    elif how == "name":
        struct.pack_into("<I", b, first + 48, 0x7FFFFFFF)
    return bytes(b)


@pytest.mark.parametrize("how", ["truncated", "magic", "offset_outside", "misaligned", "count", "huge_count",
                                 "overlap", "n_tensors", "name"])
def test_malformed_images_are_rejected_not_crashed_on(bundle, applier, tmp_path, how):
    img = tmp_path / "img.bin"
    write_flat(bundle, img, "F32")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_corrupt(img.read_bytes(), how))
    p = run_c(applier, bad, bundle.tasks[0], tmp_path / "out.bin")
    assert p.returncode == 1 and p.stderr.startswith("emflat: "), (how, p.returncode, p.stderr)
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr
    with pytest.raises(FormatError):
        read_flat(str(bad))


def test_unknown_task(bundle, applier, tmp_path):
    write_flat(bundle, tmp_path / "img.bin")
    p = run_c(applier, tmp_path / "img.bin", "nope", tmp_path / "out.bin")
    assert p.returncode == 1 and "unknown task 'nope'; valid: task0 task1 task2" in p.stderr, p.stderr


def test_float_param_no_task_changed_travels_as_base_only(applier, tmp_path):
    """enc.0.bias is the same in every task: the bundle carries it, the image holds θ0 for it and
    nothing else, and the C applier rebuilds the merged params around it."""
    from safetensors.numpy import load_file, save_file

    base, tasks = make_suite(tmp_path)
    frozen = load_file(base)["enc.0.bias"]
    for path in tasks.values():
        sd = load_file(path)
        sd["enc.0.bias"] = frozen
        save_file(sd, path)
    merge(MergeConfig(base, tasks, "ties", private=("head.*",)), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    assert {p.name: p.role for p in b.params}["enc.0.bias"] == "carried"
    img = tmp_path / "img.bin"
    write_flat(b, img, "Q16")
    _, entries, _ = read_flat(str(img))
    from edgemerge.export.flat import CODES, KINDS

    (entry,) = [e for e in entries if e.name == "enc.0.bias"]  # θ0 only, in its own dtype, not Q16
    assert (entry.kind, entry.dtype, entry.numel) == (KINDS["base"], CODES["F32"], frozen.size)
    for t in b.tasks:
        ref = rebuild(str(img), t)
        assert "enc.0.bias" not in ref and sorted(ref) == ["enc.0.weight", "enc.1.weight"]
        p = run_c(applier, img, t, tmp_path / "out.bin")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "out.bin").read_bytes() == np.concatenate([v.reshape(-1) for v in ref.values()]).astype("<f4").tobytes()


# -- version 2: every codec --------------------------------------------------------------------


def _golden_v2(path):
    """One 2×2 param, two tasks: tswitch, and an I4 delta with a correction (values by hand)."""
    from edgemerge.export.flat import CODES, I4, KINDS, NONE, TASK_CODECS, _write

    base = np.array([[1, 2], [3, 4]], "<f4")
    p = lambda kind, code, task, data, shape=None: (KINDS[kind], CODES[code], task, 0, 0, data, "w",  # noqa: E731
                                                     data.shape if shape is None else shape, 0)
    pieces = [p("base", "F32", NONE, base),
              p("mask", "U8", 0, np.array([0b10110000], np.uint8)),        # present: 0, 2, 3
              p("sign", "U8", 0, np.array([0b10010000], np.uint8)),        # negative: 0, 3
              p("scale", "F32", 0, np.array([0.5], "<f4")),
              p("delta", "U8", 1, np.array([0x1E, 0x38], np.uint8)),       # codes 1, -2, 3, -8
              p("scale", "F32", 1, np.array([0.25, 2.0], "<f4")),          # per row
              p("fixpos", "U64", 1, np.array([3], "<u8")),
              p("fixval", "F16", 1, np.array([0.5], "<f2"))]
    _write(str(path), ["a", "b"], [(TASK_CODECS["tswitch"], NONE), (TASK_CODECS["delta"], I4)], pieces, 64)


def test_v2_golden_values_in_numpy_and_c(applier, tmp_path):
    img = tmp_path / "golden.img"
    _golden_v2(img)
    want = {"a": [0.5, 2, 3.5, 3.5], "b": [1.25, 1.5, 9, -11.5]}  # b: 1+.25, 2-.5, 3+6, 4-16 (+.5 fix)
    for t, values in want.items():
        assert rebuild(str(img), t)["w"].tolist() == values
        p = run_c(applier, img, t, tmp_path / "out.bin")
        assert p.returncode == 0, p.stderr
        assert np.fromfile(tmp_path / "out.bin", "<f4").tolist() == values


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_v2_every_codec_c_numpy_and_bundle_agree(applier, tmp_path, dtype):
    """tswitch, delta (I4, I8 with xz and lowrank codes, F16), tall with a least-squares scale and emr, with corrections, in
    one bundle: the image's θ_t, cast to the model's dtype, is the bundle's, in numpy and in C."""
    from edgemerge.codecs import encode_bundle, parse_codec

    base, tasks = make_suite(tmp_path, n_tasks=7, dtype=dtype)
    merge(MergeConfig(base, tasks, "ties", private=("head.*",)), tmp_path / "v1.safetensors")
    mix = ["tswitch:density=0.3,correction=0.05", "delta:dtype=I4,correction=0.05", "tall:planes=xz,scale=ls,correction=0.05",
           "emr:planes=xz,correction=0.02", "delta:dtype=I8,qmax=2,codes=xz", "delta:dtype=F16",
           "delta:dtype=I8,codes=lowrank,bits=2"]
    encode_bundle(str(tmp_path / "v1.safetensors"), tasks, dict(zip(tasks, map(parse_codec, mix))), str(tmp_path / "v2.safetensors"))
    b = open_bundle(tmp_path / "v2.safetensors")
    assert b.codecs[list(tasks)[4]].codes == "xz"  # codes at rest as xz: the image holds them decoded
    assert b.codecs[list(tasks)[6]].codes == "lowrank"  # the same for codes rebuilt from factors
    cli = subprocess.run([sys.executable, "-m", "edgemerge", "export", "flat", str(tmp_path / "v2.safetensors"),
                          "-o", str(tmp_path / "cli.img")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "version 2: per-task codecs" in cli.stdout, cli.stdout + cli.stderr
    for encoding in ("F32", "Q16"):
        img = tmp_path / f"v2.{encoding}.img"
        write_flat(b, img, encoding)
        assert img.read_bytes()[8] == 2
        for t in b.tasks:
            ref = rebuild(str(img), t)
            assert sorted(ref) == sorted(p.name for p in b.merged)
            if encoding == "F32":
                want = b.task_weights(t)
                for k, v in ref.items():
                    assert v.astype(dtype).tobytes() == np.asarray(want[k]).tobytes(), (t, k)
            p = run_c(applier, img, t, tmp_path / "out.bin")
            assert p.returncode == 0, p.stderr
            assert (tmp_path / "out.bin").read_bytes() == np.concatenate([v.reshape(-1) for v in ref.values()]).astype("<f4").tobytes()


def test_plain_tall_stays_version_1(bundle, tmp_path):
    write_flat(bundle, tmp_path / "img.bin")
    assert struct.unpack_from("<I", (tmp_path / "img.bin").read_bytes(), 8)[0] == 1


def test_v2_without_its_codec_entries_is_refused(applier, tmp_path):
    """The tswitch task's sign plane handed to the delta task: task a lacks it and task b's codec
    does not take it -- both readers refuse."""
    img = tmp_path / "golden.img"
    _golden_v2(img)
    data = bytearray(img.read_bytes())
    struct.pack_into("<I", data, HEADER.size + ENTRY.size * 2 + 8, 1)  # the sign entry's task index
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        read_flat(str(bad))
    p = run_c(applier, bad, "a", tmp_path / "out.bin")
    assert p.returncode == 1 and p.stderr.startswith("emflat: "), p.stderr
