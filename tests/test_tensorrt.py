"""TensorRT export and TrtTaskSession.

Everything that does not need TensorRT runs here for real: version gates, trtexec lines, the
names made refittable (read from a real exported ONNX graph), the CLI. The engine tests need
``tensorrt`` and a CUDA GPU and are skipped elsewhere with the reason; none of this project's
machines has TensorRT, so they have not run yet (README says so).
"""

import subprocess
import sys

import numpy as np
import pytest

from edgemerge.errors import BackendError, ConfigError, FormatError
from edgemerge.runtime.trt_backend import match_refit_names, parse_version, refit_features

import models
from models import as_bytes, make_tiny_suite, torch_forward

pytest.importorskip("onnx")
from edgemerge.export.onnx import export_onnx  # noqa: E402
from edgemerge.export.tensorrt import managed_weights, trtexec_lines  # noqa: E402


def _has_tensorrt_and_cuda() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_trt = pytest.mark.skipif(not _has_tensorrt_and_cuda(),
                               reason="needs TensorRT (pip install 'edgemerge[tensorrt]') and an NVIDIA GPU")


@pytest.mark.parametrize("version, flag, strip, device", [
    ((8, 5, 1), "REFIT", False, False),      # JetPack 5.1
    ((8, 6, 2, 3), "REFIT", False, False),   # JetPack 6.0
    ((10, 0, 0), "REFIT", True, True),
    ((10, 1, 9), "REFIT", True, True),
    ((10, 2, 0), "REFIT_INDIVIDUAL", True, True),
    ((10, 3, 0), "REFIT_INDIVIDUAL", True, True),  # JetPack 6.1
    ((11, 3, 0), "REFIT_INDIVIDUAL", True, True),
])
def test_version_gates(version, flag, strip, device):
    f = refit_features(version)
    assert (f["flag"], f["strip_plan"], f["device_weights"]) == (flag, strip, device)
    assert f["gemm_bias_bug"] == (version[:2] == (11, 3))


def test_version_parsing_and_too_old():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    with pytest.raises(ConfigError, match="'10.x' is not dotted integers"):
        parse_version("10.x")
    with pytest.raises(BackendError, match="TensorRT 8.4 is too old.*≥ 8.5"):
        refit_features((8, 4))


def test_trtexec_lines_quote_paths():
    build, timed = trtexec_lines("my model.plain.onnx", "out/m.plan", strip=True, fp16=True)
    assert build == "trtexec --onnx='my model.plain.onnx' --saveEngine=out/m.plan --refit --stripWeights --fp16"
    assert timed == "trtexec --onnx='my model.plain.onnx' --refit --stripWeights --fp16 --timeRefit"
    assert trtexec_lines("m.onnx", "m.plan")[0] == "trtexec --onnx=m.onnx --saveEngine=m.plan --refit"


def test_refit_name_problems_name_the_weights():
    assert match_refit_names(["a", "b", "c"], ["a", "b"]) == []
    problems = match_refit_names(["a"], ["a", "enc.0.weight", "enc.0.bias"], missing_after_set=["x.scale"])
    assert problems == [
        "not refittable in the engine (rebuild it with `edgemerge export tensorrt`): enc.0.bias, enc.0.weight",
        "TensorRT also needs these weights, which the bundle does not hold: x.scale",
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    bundle = make_tiny_suite(d, heads=(3, 3, 3))  # one head shape: a plain graph (and engine) serves every task
    exp = export_onnx(bundle, models.tiny, str(d), input_names=["x"], output_names=["logits"])
    return bundle, exp, d


def test_refittable_names_are_the_bundle_weights_in_the_graph(exported, tmp_path):
    bundle, exp, _ = exported
    names = managed_weights(bundle, exp.plain)
    merged = [p.name for p in bundle.params if p.role == "merged"]
    assert names[: len(merged)] == merged and sorted(names[len(merged):]) == ["head.bias", "head.weight"]
    other = make_tiny_suite(tmp_path, seed=5)
    with pytest.raises(FormatError, match="not exported from the base model of"):
        managed_weights(other, exp.plain)


def test_cli_prints_trtexec_lines_and_explains_a_missing_tensorrt(exported):
    bundle, exp, d = exported
    engine = d / "tiny.plan"
    cmd = [sys.executable, "-m", "edgemerge.cli", "export", "tensorrt", bundle.path, "--onnx", exp.plain, "-o", str(engine)]
    p = subprocess.run([*cmd, "--trtexec-only"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"trtexec --onnx={exp.plain} --saveEngine={engine} --refit" in p.stdout
    # enc.* (4 merged) and head.* (2 private); norm.* is carried (no task changed it): not refittable
    assert [p.role for p in bundle.params] == ["merged"] * 4 + ["carried"] * 2
    assert "6 weights will be refittable" in p.stdout
    if not _has_tensorrt_and_cuda():
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "TensorRT is not installed" in p.stdout + p.stderr
        assert not engine.exists()


@needs_trt
@pytest.mark.parametrize("strip", [False, True])
def test_refit_engine_matches_onnx_runtime_for_every_task(exported, strip):
    import onnxruntime as ort
    import tensorrt

    from edgemerge.export.tensorrt import build_engine
    from edgemerge.runtime.session import TaskSession
    from edgemerge.runtime.trt_backend import TrtTaskSession

    bundle, exp, d = exported
    if strip and not refit_features(parse_version(tensorrt.__version__))["strip_plan"]:
        pytest.skip(f"TensorRT {tensorrt.__version__} cannot strip plans")
    plan = build_engine(bundle, exp.plain, str(d / f"tiny{int(strip)}.plan"), strip=strip)
    trt_s = TrtTaskSession(bundle, plan["engine"])
    ort_s = TaskSession(bundle, exp.switchable)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    for task in bundle.tasks * 2:  # back and forth: absolute weights, no drift
        got = trt_s.run({"x": x}, task=task)[0].cpu().numpy()
        want = ort_s.run(x, task=task)[0]
        # TF32 may be used by TensorRT's GEMMs on Ampere and later; a dropped bias would be O(1)
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3, err_msg=task)
        assert np.abs(want - torch_forward(bundle, task, x)).max() <= 1e-4
    assert ort.get_device()  # ONNX Runtime really ran


# -- TrtTaskSession's own side of the TensorRT contract, against a recording stand-in -------------
# This does not verify TensorRT. It runs TrtTaskSession's code on a real GPU (real FlatWeights,
# real kernel, real streams) with a stand-in ``tensorrt`` module that records what the session
# hands over, and checks that: every merged weight is registered once, as device weights at the
# address of its persistent buffer; the buffers hold θ_t when the refit is issued; heads are set
# per switch; missing or unknown weights fail with their names; 8.x takes the host path.

def _fake_trt(version, names, missing=()):
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.bfloat16 = "f32", "f16", "bf16"
    trt.TensorLocation = types.SimpleNamespace(DEVICE="device", HOST="host")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.calls = []
    trt.pending = set(missing)  # asked for until set; asked for again after each refit

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Weights:
        def __init__(self, *args):
            self.args = args

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["x", "logits"][i]

        def get_tensor_mode(self, n):
            return "input" if n == "x" else "output"

        def get_tensor_dtype(self, n):
            return types.SimpleNamespace(name="FLOAT")

        def create_execution_context(self):
            return Context()

    class Context:
        def set_input_shape(self, n, shape):
            self.batch = shape[0]

        def set_tensor_address(self, n, ptr):
            trt.calls.append(("address", n, ptr))

        def get_tensor_shape(self, n):
            return (self.batch, 3)

        def execute_async_v3(self, stream):
            trt.calls.append(("execute", stream))
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"engine" else None

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def get_all_weights(self):
            return list(names)

        def set_named_weights(self, name, w, location="host"):
            trt.calls.append(("set", name, location, w.args))
            trt.pending.discard(name)
            return name in names

        def get_missing_weights(self):
            return sorted(trt.pending)

        def refit_cuda_engine_async(self, stream):
            trt.calls.append(("refit_async", stream))
            trt.on_refit()
            trt.pending = set(missing)
            return True

        def refit_cuda_engine(self):
            trt.calls.append(("refit", None))
            trt.on_refit()
            trt.pending = set(missing)
            return True

    trt.Logger, trt.Weights, trt.Runtime, trt.Refitter = Logger, Weights, Runtime, Refitter
    return trt


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")
def test_session_contract_with_a_recording_stand_in(exported, monkeypatch, tmp_path):
    import torch

    from edgemerge.runtime.trt_backend import TrtTaskSession

    bundle, _, _ = exported
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"engine")
    merged = [p.name for p in bundle.params if p.role == "merged"]
    names = merged + ["head.weight", "head.bias", "some.constant"]
    trt = _fake_trt("10.3.0", names)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    s = TrtTaskSession(bundle, str(engine))
    registered = [c for c in trt.calls if c[0] == "set"]
    assert [c[1] for c in registered] == merged
    for _, name, loc, (dtype, ptr, count) in registered:
        view = s._flat.view(name)
        assert (loc, dtype, ptr, count) == ("device", "f32", view.data_ptr(), view.numel())
    snapshots = []
    trt.on_refit = lambda: snapshots.append({n: as_bytes(s._flat.view(n)) for n in merged})
    for task in bundle.tasks * 2:
        trt.calls.clear()
        s.switch(task)
        want = bundle.task_weights(task)
        assert snapshots[-1] == {n: np.ascontiguousarray(want[n]).tobytes() for n in merged}
        kinds = [c[0] for c in trt.calls]
        assert kinds == ["set", "set", "refit_async"]  # the two head tensors, then one refit
        heads = {c[1]: c[3] for c in trt.calls if c[0] == "set"}
        for k in ("head.weight", "head.bias"):
            dtype, ptr, count = heads[k]
            assert as_bytes(s._private[task][k]) == np.ascontiguousarray(want[k]).tobytes() and ptr == s._private[task][k].data_ptr()
    out = s.run({"x": np.zeros((4, 8), np.float32)})
    assert out[0].shape == (4, 3) and out[0].is_cuda
    with pytest.raises(ConfigError, match="engine inputs are x; got y"):
        s.run({"y": np.zeros((4, 8), np.float32)})

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0", names[1:]))
    with pytest.raises(FormatError, match=f"not refittable in the engine.*{merged[0]}"):
        TrtTaskSession(bundle, str(engine))
    bad = _fake_trt("10.3.0", names, missing=["fused.scale"])
    bad.on_refit = lambda: None
    monkeypatch.setitem(sys.modules, "tensorrt", bad)
    with pytest.raises(FormatError, match="(?s)cannot refit 't0'.*fused.scale"):
        TrtTaskSession(bundle, str(engine)).switch("t0")

    old = _fake_trt("8.6.2", names)  # JetPack 6.0: host weights, synchronous refit
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    s = TrtTaskSession(bundle, str(engine))
    got = {}
    old.on_refit = lambda: got.update({c[1]: np.array(c[3][0]) for c in old.calls if c[0] == "set"})
    s.switch("t2")
    want = bundle.task_weights("t2")
    assert sorted(got) == sorted(merged + ["head.weight", "head.bias"])  # carried weights stay as built
    assert {n: got[n].tobytes() for n in got} == {n: np.ascontiguousarray(want[n]).tobytes() for n in got}
    assert ("refit", None) in old.calls and not any(c[0] == "refit_async" for c in old.calls)

    # every weight refittable (REFIT before 10.2) and a carried one fused with a merged one: TensorRT
    # asks for it at every refit and gets θ0
    fused = _fake_trt("8.6.2", names + ["norm.weight"], missing=["norm.weight"])
    fused.on_refit = lambda: None
    monkeypatch.setitem(sys.modules, "tensorrt", fused)
    s = TrtTaskSession(bundle, str(engine))
    for task in ("t0", "t1"):
        fused.calls.clear()
        s.switch(task)
        (norm,) = [c for c in fused.calls if c[0] == "set" and c[1] == "norm.weight"]
        assert np.array(norm[3][0]).tobytes() == np.asarray(bundle.base("norm.weight")).tobytes()
        assert fused.calls[-1] == ("refit", None)
    assert torch.cuda.is_available()
