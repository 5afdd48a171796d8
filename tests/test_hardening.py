"""Untrusted files and faults: fuzzed readers, killed writers, a full disk, a bounded address space."""

import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemerge.errors import EdgemergeError
from edgemerge.export.flat import read_flat, write_flat
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle

from conftest import make_suite


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    base, tasks = make_suite(d, n_tasks=2)
    merge(MergeConfig(base, tasks, "ties", private=("head.*",)), d / "b.safetensors")
    write_flat(str(d / "b.safetensors"), str(d / "b.flat"))
    return (d / "b.safetensors").read_bytes(), (d / "b.flat").read_bytes(), d


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        p = pos % len(b)
        if kind == 0:
            b[p] ^= 1 << (val % 8)                # bit flip
        elif kind == 1:
            del b[p:]                              # truncate
        elif kind == 2:
            b[p:p + 8] = (val * 0x9E3779B97F4A7C15 & (2**64 - 1)).to_bytes(8, "little")  # a big number
        else:
            b[p:p] = bytes([val % 256]) * (val % 17)  # insertion shifts everything after it
    return bytes(b)


OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**31), st.integers(0, 2**31)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_fuzzed_bundles_fail_only_with_our_error(files, ops):
    bundle, _, d = files
    p = d / "m.safetensors"
    p.write_bytes(mutate(bundle, ops))
    try:
        with open_bundle(p, verify=True) as b:
            for t in b.tasks:  # a mutation that survives verification must still rebuild cleanly
                b.task_weights(t)
    except EdgemergeError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_fuzzed_flat_images_fail_only_with_our_error(files, ops):
    _, flat, d = files
    p = d / "m.flat"
    p.write_bytes(mutate(flat, ops))
    try:
        read_flat(str(p))
    except EdgemergeError:
        pass


WRITER = """
import sys, numpy as np
from edgemerge.io import write_safetensors
v = float(sys.argv[2])
write_safetensors(sys.argv[1], {f"t{i}": np.full(1 << 20, v, np.float32) for i in range(24)})
"""


def test_killed_writer_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "x.safetensors"
    subprocess.run([sys.executable, "-c", WRITER, str(target), "1"], check=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(i + 2)])
        time.sleep(float(rng.uniform(0.05, 0.6)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        with open_bundle_or_plain(target) as values:
            (value,) = values  # one value throughout: a whole old file or a whole new one
            assert value in {1.0} | {float(k + 2) for k in range(i + 1)}
    # the temp files of killed writers stay behind (a SIGKILL runs no cleanup); never under the target name
    assert all(f.name == "x.safetensors" or f.name.startswith(".x.safetensors.") for f in tmp_path.iterdir())


class open_bundle_or_plain:
    """Read every tensor of a plain safetensors file with the validating reader; yield the values seen."""

    def __init__(self, path):
        from edgemerge.runtime.safetensors import map_file, read_header, tensor_view

        h = read_header(path)
        mm = map_file(path)
        self.values = {float(v) for n in h.tensors for v in np.unique(tensor_view(mm, h, n))}

    def __enter__(self):
        assert len(self.values) == 1, self.values
        return self.values

    def __exit__(self, *exc):
        return False


def test_disk_full_gives_clear_error_and_no_partial_file(tmp_path):
    code = f"""
import resource, numpy as np
from edgemerge.io import write_safetensors
from edgemerge.errors import EdgemergeError
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
try:
    write_safetensors({str(tmp_path / 'big.safetensors')!r}, {{"x": np.zeros(1 << 20, np.float32)}})
except EdgemergeError as e:
    print("ERR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("ERR") and "write failed" in out and "nothing was written" in out
    assert list(tmp_path.iterdir()) == []


def test_streaming_merge_under_an_address_space_limit(tmp_path):
    """Inputs total more than the address-space limit the merge runs under, and it completes."""
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file

    shapes = {f"layer{i}.weight": (1024, 1024) for i in range(24)}  # 24 M params = 96 MiB per file
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t in range(8):
        save_file({k: v + np.float32(0.01) * t for k, v in base.items()}, str(tmp_path / f"t{t}.safetensors"))
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    inputs = sum(os.path.getsize(p) for p in [tmp_path / "base.safetensors", *tasks.values()])
    code = f"""
import resource
from edgemerge.pipeline import MergeConfig, merge
merge(MergeConfig({str(tmp_path / 'base.safetensors')!r}, {tasks!r}, "ties", chunk_elems=1 << 18), {str(tmp_path / 'out.safetensors')!r})
# VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the forked parent across exec
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""
    # numpy path (numba's compiler alone reserves more address space than this), one BLAS thread
    limit = 640 << 20
    assert inputs > limit
    env = {**os.environ, "EDGEMERGE_NO_NUMBA": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert p.returncode == 0, p.stderr[-2000:]
    rss = int(p.stdout.strip().splitlines()[-1])
    assert rss < inputs / 2
    assert open_bundle(tmp_path / "out.safetensors", verify=True).tasks == tuple(tasks)
