"""Nothing silently wrong from damaged storage (issue 13, item 3): each tensor is checked against its
sha256 the first time any path reads it; an open file truncated or rewritten in place is refused
at the next switch instead of crashing (SIGBUS) or serving other bytes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from edgemerge.errors import ConfigError, FormatError
from edgemerge.runtime import open_bundle
from edgemerge.runtime.torch_backend import TorchTaskModel

import models
from models import make_tiny_suite


@pytest.fixture
def bundle_path(tmp_path):
    b = make_tiny_suite(tmp_path)
    b.close()
    return tmp_path / "bundle.safetensors"


def _flip_one_byte(path, tensor: str) -> None:
    b = open_bundle(path, verify="off")
    e = b.header.tensors[tensor]
    offset = b.header.data_start + e.start + (e.end - e.start) // 2
    b.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_damaged_tensor_is_refused_by_every_path_that_reads_it(bundle_path, tmp_path):
    from edgemerge.export.flat import write_flat

    _flip_one_byte(bundle_path, "vector/enc.0.weight")
    msg = r"tensor 'vector/enc.0.weight' does not match its checksum"
    with pytest.raises(FormatError, match=msg):
        open_bundle(bundle_path).task_weights("t0")
    with pytest.raises(FormatError, match=msg):
        TorchTaskModel(str(bundle_path), models.Tiny(2), kernel="numpy").switch("t0")
    with pytest.raises(FormatError, match=msg):
        write_flat(str(bundle_path), str(tmp_path / "x.img"))
    p = subprocess.run([sys.executable, "-m", "edgemerge.cli", "extract", str(bundle_path), "--task", "t0", "-o",
                        str(tmp_path / "extracted.safetensors")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not match its checksum" in p.stderr and not (tmp_path / "extracted.safetensors").exists()
    # the explicit opt-out serves the stored bytes (here: the damaged ones), as it says
    off = open_bundle(bundle_path, verify="off")
    assert off.task_weights("t0")["enc.0.weight"].shape == (16, 8)
    with pytest.raises(ConfigError, match="unknown verify policy 'never'; valid: first-use, off, open"):
        open_bundle(bundle_path, verify="never")


def test_a_damaged_tensor_is_refused_in_onnx_runtime(bundle_path, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgemerge.export.onnx import export_onnx
    from edgemerge.runtime.session import TaskSession

    exp = export_onnx(open_bundle(bundle_path), models.tiny, str(tmp_path), input_names=["x"], output_names=["logits"])
    _flip_one_byte(bundle_path, "mask/t1/enc.2.weight")
    s = TaskSession(str(bundle_path), exp.switchable)
    s.switch("t0")  # t1's mask is not read by t0
    with pytest.raises(FormatError, match=r"'mask/t1/enc.2.weight' does not match its checksum"):
        s.switch("t1")
    assert s.current == "t0"  # still serving t0, whole


def test_only_the_first_read_pays_for_the_check(bundle_path, monkeypatch):
    import edgemerge.runtime.bundle as rb

    calls = []
    real = rb._sha256
    monkeypatch.setattr(rb, "_sha256", lambda a: calls.append(1) or real(a))
    b = open_bundle(bundle_path)
    b.task_weights("t0")
    first = len(calls)
    b.task_weights("t0")
    assert first > 0 and len(calls) == first  # verified once per tensor
    open_bundle(bundle_path, verify="off").task_weights("t0")
    assert len(calls) == first


def test_truncated_or_rewritten_in_place_while_open_is_refused(bundle_path):
    b = open_bundle(bundle_path)
    tm = TorchTaskModel(b, models.Tiny(2), kernel="numpy")
    tm.switch("t0")
    size = os.path.getsize(bundle_path)
    os.truncate(bundle_path, size // 2)  # touching the mapped tail now would be SIGBUS
    with pytest.raises(FormatError, match=r"was truncated to \d+ of \d+ bytes while open"):
        tm.switch("t1")
    assert tm.current == "t0"


def test_rewritten_in_place_is_refused_but_an_atomic_replacement_is_not(bundle_path, tmp_path):
    b = open_bundle(bundle_path)
    b.task_weights("t0")
    st = os.stat(bundle_path)
    with open(bundle_path, "r+b") as f:  # same size, other bytes, same inode
        f.seek(st.st_size - 1)
        f.write(b"\0")
    os.utime(bundle_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(FormatError, match="rewritten in place while open"):
        b.task_weights("t1")
    (tmp_path / "other").mkdir()
    c = make_tiny_suite(tmp_path / "other")
    before = {k: np.array(v) for k, v in c.task_weights("t0").items()}
    os.replace(bundle_path, c.path)  # a new inode under the open bundle's name: the mapping keeps the old
    assert all(np.array_equal(np.array(v), before[k]) for k, v in c.task_weights("t0").items())


def test_verify_open_checks_everything_up_front(bundle_path):
    _flip_one_byte(bundle_path, "base/norm.weight")
    with pytest.raises(FormatError, match=r"checksum mismatch \(damaged data\) in tensor\(s\): base/norm.weight"):
        open_bundle(bundle_path, verify="open")
    with pytest.raises(FormatError, match="checksum mismatch"):
        open_bundle(bundle_path, verify=True)
