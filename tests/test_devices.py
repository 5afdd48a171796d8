"""Device profiles and `edgemerge plan`: the projection arithmetic, exactly."""

import json
import subprocess
import sys

import pytest

from edgemerge.devices.plan import Sizes, project, sizes
from edgemerge.devices.profiles import DEVICES, JETPACK_TENSORRT, STORAGE_READ, get_device
from edgemerge.errors import ConfigError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle


def test_every_profile_has_sources_and_sane_figures():
    for d in DEVICES.values():
        assert d.sources and all(d.sources.values())
        assert 0 < d.os_reserved_bytes < d.ram_bytes and d.bandwidth > 1e9
        assert all(s in STORAGE_READ for s in d.storage)
    assert JETPACK_TENSORRT["5.1"] == "8.5.2" and JETPACK_TENSORRT["6.1"] == JETPACK_TENSORRT["6.2"] == "10.3"
    assert get_device("orin-nano-8gb").tensorrt["6.0"].startswith("8.6")
    with pytest.raises(ConfigError, match="unknown device 'orin'; valid: agx-orin-64gb"):
        get_device("orin")


def test_projection_arithmetic_exactly():
    s = Sizes(n_tasks=8, base=400_000_000, vector=400_000_000, mask_one_task=12_500_000, private_one_task=100_000,
              model=400_000_000, merged_numel=100_000_000, kernel_touch=1_212_500_000, separate_model=400_100_000)
    d = get_device("orin-nano-8gb")  # 8 GiB, 1 GiB kept by the OS, 68 GB/s, NVMe Gen3 2.5 GB/s
    p = project(s, d, "inputs", None, efficiency=0.5, activation_bytes=50_000_000)
    touched = 400_000_000 + 400_000_000 + 12_500_000 + 100_000
    assert p["resident_bytes"] == touched + 400_000_000 + 50_000_000
    assert p["available_bytes"] == 7 * 2**30 and p["fits"] is True
    assert p["cold_start_s"] == touched / 2.5e9
    assert p["switch_s"] == 1_212_500_000 / (68e9 * 0.5)
    assert p["separate_load_s"] == 400_100_000 / 2.5e9
    assert p["speedup"] == p["separate_load_s"] / p["switch_s"]
    assert p["bundle_storage_bytes"] == 800_000_000 + 8 * 12_600_000
    assert p["separate_storage_bytes"] == 8 * 400_100_000
    assert p["resident_parts"] == {"bundle data a switch holds": touched, "engine weights": 400_000_000,
                                   "activations": 50_000_000}
    assert p["cold_switch_read_bytes"] == touched and p["cold_switch_s"] == touched / 2.5e9 + p["switch_s"]
    assert p["cold_read_vs_checkpoint"] == touched / 400_100_000  # ≈ 2.03: θ0 + τ_MTL + masks + head
    assert p["warm_ram_bytes"] == touched + 400_000_000
    ranged = project(s, d, "inputs", None, efficiency=(0.25, 1.0))
    assert ranged["switch_s_range"] == [1_212_500_000 / 68e9, 1_212_500_000 / (68e9 * 0.25)]
    assert ranged["switch_s"] == ranged["switch_s_range"][1]  # single figures take the slow end
    with pytest.raises(ConfigError, match="low <= high"):
        project(s, d, "inputs", None, efficiency=(0.9, 0.5))
    sessions = project(s, d, "sessions", "microsd", efficiency=0.5)
    assert sessions["resident_bytes"] == touched + 8 * 400_000_000 and sessions["fits"] is True  # 4.0 GB of 7 GiB
    assert project(s, get_device("jetson-nano-4gb"), "sessions", "microsd")["fits"] is False    # of 3 GiB
    assert sessions["separate_load_s"] == 400_100_000 / 90e6


def test_sizes_from_a_real_bundle(tmp_path):
    from conftest import make_suite

    base, tasks = make_suite(tmp_path)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    s = sizes(b)
    numel = 48 * 20 + 48 + 33 * 48
    assert s.merged_numel == numel and s.vector == 4 * numel and s.base == 4 * numel + 8
    assert s.kernel_touch == numel * 12 + sum((n + 7) // 8 for n in (48 * 20, 48, 33 * 48))
    assert s.private_one_task == 4 * 4 * 33  # task2's head: 4 x 33 floats


def _v2_bundle(tmp_path, codec: str):
    """The test suite merged, then every task re-encoded with ``codec`` (format v2), opened."""
    from conftest import make_suite
    from edgemerge.codecs import encode_bundle, parse_codec

    base, tasks = make_suite(tmp_path)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    encode_bundle(str(tmp_path / "b.safetensors"), tasks, {t: parse_codec(codec) for t in tasks}, str(tmp_path / "v2.safetensors"))
    return open_bundle(tmp_path / "v2.safetensors")


def test_sizes_of_a_v2_bundle_without_a_shared_vector(tmp_path):
    """tswitch tasks read θ0 + their own compressed bits: a cold switch reads about one checkpoint."""
    b = _v2_bundle(tmp_path, "tswitch:density=0.1")
    s = sizes(b)
    h = b.header.tensors
    own = {t: sum(e.end - e.start for n, e in h.items() if n.split("/")[0] in ("planes", "scale") and n.split("/")[1] == t)
           for t in b.tasks}
    reads = {t: own[t] + sum(h[f"task/{t}/{k}"].end - h[f"task/{t}/{k}"].start for k in b.private_keys[t]) for t in b.tasks}
    worst = max(reads, key=reads.get)
    assert s.vector == 0 and not s.reads_vector and s.mask_one_task == own[worst] and s.codec_bytes == sum(own.values())
    numel = 48 * 20 + 48 + 33 * 48
    assert s.kernel_touch == 8 * numel + 2 * (120 + 6 + 198)  # θ0 read, θ_t written, two planes
    held = {t: own[t] - h[f"planes/{t}"].end + h[f"planes/{t}"].start + 2 * (120 + 6 + 198) for t in b.tasks}
    assert s.held_one_task == max(held.values()) > s.mask_one_task  # xz planes held decoded: presence + full sign plane
    p = project(s, DEVICES["orin-nano-8gb"])
    assert p["warm_ram_bytes"] == s.base + s.private_one_task + s.held_one_task + s.model
    assert p["cold_switch_read_bytes"] == s.base + reads[worst]
    assert p["cold_read_vs_checkpoint"] == (s.base + reads[worst]) / (s.base + s.private_one_task) < 1.1


def test_held_codes_of_an_xz_delta(tmp_path):
    """A quantized delta stored as xz is read small but held as its raw codes after the first switch."""
    b = _v2_bundle(tmp_path, "delta:dtype=I8,qmax=1,codes=xz")
    s, h = sizes(b), b.header.tensors
    assert all(b.codecs[t].codes == "xz" for t in b.tasks)
    own = {t: sum(e.end - e.start for n, e in h.items() if n.split("/")[0] in ("dcodes", "dscale") and n.split("/")[1] == t)
           for t in b.tasks}
    numel = 48 * 20 + 48 + 33 * 48
    assert s.held_one_task == max(o - (h[f"dcodes/{t}"].end - h[f"dcodes/{t}"].start) + numel for t, o in own.items())
    assert s.codec_bytes == sum(own.values()) and s.held_one_task > s.mask_one_task


def test_cli_devices_and_plan(tmp_path):
    from conftest import make_suite

    base, tasks = make_suite(tmp_path)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    import os

    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "edgemerge.cli", "devices"], capture_output=True, text=True, check=True, env=env).stdout
    assert "orin-nano-8gb" in out and "zcu104" in out
    p = subprocess.run([sys.executable, "-m", "edgemerge.cli", "plan", str(tmp_path / "b.safetensors"), "--device", "zcu102",
                        "--efficiency", "0.25", "--json"], capture_output=True, text=True, check=True)
    res = json.loads(p.stdout)
    assert res["fits"] is True and res["storage"] == "microsd" and res["efficiency"] == 0.25


def test_plan_from_another_architecture_gives_a_range_and_says_why(tmp_path):
    import platform

    from conftest import make_suite

    base, tasks = make_suite(tmp_path)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    env = {**__import__("os").environ, "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "edgemerge.cli", "plan", str(tmp_path / "b.safetensors"), "--device",
                          "orin-nano-8gb"], capture_output=True, text=True, check=True, env=env).stdout
    assert "of which engine weights" in out and "of which bundle data a switch holds" in out
    assert "task switch (cold page cache, nvme_gen3)" in out and "× one checkpoint" in out
    assert "RAM to keep switches warm" in out
    if platform.machine().lower() not in ("aarch64", "arm64"):
        assert "not measured: this host is" in out and "25%-100% of peak bandwidth" in out
