"""Flat image: numpy reference vs the bundle, and the C applier (ASan + UBSan) vs numpy, bit for bit."""

import os
import shutil
import struct
import subprocess

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
