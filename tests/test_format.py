"""The file format: golden bytes, determinism, and a reader that distrusts every number."""

import hashlib
import re
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgemerge.bundle import write_bundle
from edgemerge.errors import FormatError
from edgemerge.io import CHECKSUM_KEY, Lazy, write_safetensors
from edgemerge.runtime import open_bundle
from edgemerge.runtime.safetensors import MAX_HEADER_BYTES, read_header


def tiny_bundle(path, order=("a", "b")):
    base = {"w": np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -0.0]], np.float32), "steps": np.array([3], np.int64)}
    vector = {"w": np.array([[0.25, 0.5, -1.0], [2.0, -0.125, 1.0]], np.float32)}
    masks = {"a": {"w": np.array([0b10110000], np.uint8)}, "b": {"w": np.array([0b01001100], np.uint8)}}
    tasks = {t: {"lambda": 0.4, "density": 0.5} for t in order}
    return write_bundle(path, tasks=tasks, base=base, vector=vector, masks=masks,
                        private={"b": {"head": np.arange(4, dtype=np.float16)}},
                        method={"name": "task_arithmetic", "params": {"scale": 1.0}})


# Changing these is a format change: bump FORMAT_VERSION and document it in docs/format.md.
GOLDEN_SHA256 = "07fafbb42b4ce66475d2a0b2406e6157459bc2b16f4ad8138c54b6bfda89a169"
GOLDEN_SIZE = 1538


def test_golden_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr("edgemerge.bundle.__version__", "golden")  # a release must not change the bytes
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0, "data buffer starts 8-byte aligned"
    assert (len(data), hashlib.sha256(data).hexdigest()) == (GOLDEN_SIZE, GOLDEN_SHA256)


def test_rebuild_is_a_select_and_bit_exact(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)
    b = open_bundle(p, verify=True)
    wa = b.task_weights("a")
    # mask a = 1 0 1 1 0 0 : θ0 + τ where set, θ0 elsewhere (-0.0 stays -0.0)
    expect = np.array([[1.25, -2.0, 2.0], [2.5, 0.0, -0.0]], np.float32)
    assert wa["w"].tobytes() == expect.tobytes()
    assert wa["steps"].tolist() == [3]
    assert "head" not in wa
    wb = b.task_weights("b")
    assert wb["w"].tobytes() == np.array([[1.0, -1.5, 3.0], [0.5, -0.125, 1.0]], np.float32).tobytes()
    assert wb["head"].dtype == np.float16 and wb["head"].tolist() == [0, 1, 2, 3]


def test_bytes_do_not_depend_on_dict_order(tmp_path):
    tiny_bundle(tmp_path / "x.safetensors", ("a", "b"))
    # same tasks given in the other order: tensors sort the same, the manifest keeps task order
    base = {"steps": np.array([3], np.int64), "w": np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -0.0]], np.float32)}
    lazy = {k: Lazy(("F32" if v.dtype == np.float32 else "I64"), v.shape, lambda v=v: v) for k, v in base.items()}
    write_bundle(tmp_path / "y.safetensors", tasks={"a": {"lambda": 0.4, "density": 0.5}, "b": {"lambda": 0.4, "density": 0.5}},
                 base=lazy, vector={"w": np.array([[0.25, 0.5, -1.0], [2.0, -0.125, 1.0]], np.float32)},
                 masks={"b": {"w": np.array([0b01001100], np.uint8)}, "a": {"w": np.array([0b10110000], np.uint8)}},
                 private={"b": {"head": np.arange(4, dtype=np.float16)}},
                 method={"params": {"scale": 1.0}, "name": "task_arithmetic"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


def test_bundle_is_a_valid_safetensors_file(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)
    loaded = load_file(str(p))
    assert sorted(loaded) == ["base/steps", "base/w", "mask/a/w", "mask/b/w", "task/b/head", "vector/w"]
    assert loaded["mask/a/w"].tolist() == [0b10110000]


def test_manifest_contents(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)
    m = open_bundle(p).manifest
    assert m["format"] == "edgemerge.bundle" and m["format_version"] == 1
    assert [t["name"] for t in m["tasks"]] == ["a", "b"]
    assert m["params"] == [{"name": "steps", "shape": [1], "dtype": "I64", "role": "carried"},
                           {"name": "w", "shape": [2, 3], "dtype": "F32", "role": "merged"}]
    assert m["mask"]["bit_order"] == "big" and m["private"] == {"b": ["head"]}


# -- the reader distrusts the file ---------------------------------------------------------------


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture
def plain(tmp_path):
    p = tmp_path / "plain.safetensors"
    write_safetensors(p, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.uint8)}, checksums=False)
    return p


def test_reader_rejects_truncation(plain):
    data = plain.read_bytes()
    for cut, msg in [(4, "too short"), (20, "header claims"), (len(data) - 1, "truncated or trailing")]:
        plain.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=msg):
            read_header(plain)


def test_reader_rejects_huge_header_claim(plain):
    data = plain.read_bytes()
    plain.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + data[8:])
    with pytest.raises(FormatError, match="more than the"):
        read_header(plain)
    plain.write_bytes(struct.pack("<Q", 10 << 30) + data[8:])  # a 10 GB claim must not allocate
    with pytest.raises(FormatError, match="cap"):
        read_header(plain)


@pytest.mark.parametrize("edit, msg", [
    (lambda h: h["a"].update(data_offsets=[0, 20]), "'a': data_offsets span 20 bytes but shape"),
    (lambda h: h["a"].update(dtype="F8"), "'a': unknown dtype 'F8'"),
    (lambda h: h["a"].update(shape=[2, -3]), "'a': shape must be a list of non-negative"),
    (lambda h: h["b"].update(data_offsets=[20, 23]), "'b' at byte 20 overlaps"),
    (lambda h: h["b"].update(data_offsets=[28, 31]), "'b' at byte 28 leaves a gap"),
    (lambda h: h["a"].update(data_offsets=[5, 2]), "begin <= end"),
    (lambda h: h.update({"__metadata__": {"x": 1}}), "__metadata__ must map strings to strings"),
    (lambda h: h.update({"c\x01": h.pop("b")}), "control characters"),
    (lambda h: h["a"].update(extra=1), "exactly dtype, shape and data_offsets"),
])
def test_reader_rejects_bad_entries(plain, edit, msg):
    _rewrite_header(plain, edit)
    with pytest.raises(FormatError, match=msg.replace("[", r"\[").replace("]", r"\]")) as exc:
        read_header(plain)
    assert str(plain) in str(exc.value)


def test_reader_rejects_non_json(plain):
    data = plain.read_bytes()
    plain.write_bytes(data[:9] + b"\xff" + data[10:])
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        read_header(plain)
    plain.write_bytes(data[:8] + b" " + data[9:])  # JSON allows leading blanks; the safetensors library does not
    with pytest.raises(FormatError, match="header must start with"):
        read_header(plain)


def test_bundle_reader_rejects_inconsistent_manifest(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)

    def drop_mask(h):
        m = json.loads(h["__metadata__"]["edgemerge.manifest"])
        m["tasks"].append({"name": "c"})
        h["__metadata__"]["edgemerge.manifest"] = json.dumps(m)

    _rewrite_header(p, drop_mask)
    with pytest.raises(FormatError, match="tensor 'mask/c/w' named by the manifest is missing"):
        open_bundle(p)


def test_bundle_reader_rejects_newer_version(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)

    def bump(h):
        m = json.loads(h["__metadata__"]["edgemerge.manifest"])
        m["format_version"] = 4
        h["__metadata__"]["edgemerge.manifest"] = json.dumps(m)

    _rewrite_header(p, bump)
    with pytest.raises(FormatError, match=r"v4 is newer than this edgemerge reads \(v3\); upgrade"):
        open_bundle(p)


def test_verify_names_the_damaged_tensor(tmp_path):
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)
    b = open_bundle(p)
    e = b.header.tensors["vector/w"]
    b.close()
    data = bytearray(p.read_bytes())
    data[b.header.data_start + e.start + 5] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"checksum mismatch .* vector/w"):
        open_bundle(p, verify=True)


def test_checksums_match_data(tmp_path):
    p = tmp_path / "x.safetensors"
    arr = np.arange(5, dtype=np.float32)
    digests = write_safetensors(p, {"x": arr})
    assert digests["x"] == hashlib.sha256(arr.tobytes()).hexdigest()
    assert json.loads(read_header(p).metadata[CHECKSUM_KEY]) == digests


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"x": np.zeros(3, np.float32)})
    before = p.read_bytes()

    def boom():
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        write_safetensors(p, {"x": np.ones(3, np.float32), "y": Lazy("F32", (2,), boom)})
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_lazy_tensor_must_match_its_declaration(tmp_path):
    with pytest.raises(FormatError, match="tensor 'y': produced"):
        write_safetensors(tmp_path / "x.safetensors", {"y": Lazy("F32", (2,), lambda: np.zeros(3, np.float32))})


@pytest.mark.parametrize("edit, msg", [
    (lambda m: m.pop("vector_dtype"), "manifest 'vector_dtype' must be one of F32, F16, BF16"),
    (lambda m: m["mask"].pop("policy"), "manifest mask 'policy' must be one of tall, none"),
    (lambda m: m.update(private={"b": "head"}), "manifest 'private' must map tasks to lists"),
    (lambda m: m["tasks"].append({"name": "../x"}), "task name '../x' is not allowed"),
])
def test_manifest_fields_are_checked(tmp_path, edit, msg):
    """Found by bench/fuzz_readers.py: missing manifest fields raised KeyError instead of FormatError."""
    p = tmp_path / "tiny.safetensors"
    tiny_bundle(p)

    def apply(h):
        m = json.loads(h["__metadata__"]["edgemerge.manifest"])
        edit(m)
        h["__metadata__"]["edgemerge.manifest"] = json.dumps(m)

    _rewrite_header(p, apply)
    with pytest.raises(FormatError, match=re.escape(msg)):
        open_bundle(p)
