"""Regression tests for the defect classes the conformance matrix was built to catch (issue 12):
sessions mode and graph optimization, running statistics, tied parameters, 0-d tensors, half
precision, overflowing task vectors and strict JSON. Each failed on the code before its fix."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from edgemerge.bundle import write_bundle
from edgemerge.errors import CheckpointError, ConfigError, FormatError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle
from edgemerge.runtime.torch_backend import TorchTaskModel

import models
from models import make_tiny_suite


def _files(tmp_path, base: dict, tasks: list[dict], fmt="safetensors"):
    def write(name, sd):
        if fmt == "torch":
            path = tmp_path / f"{name}.pt"
            torch.save(sd, path)
        else:
            path = tmp_path / f"{name}.safetensors"
            save_file(sd, str(path))
        return str(path)

    return write("base", base), {f"t{i}": write(f"t{i}", sd) for i, sd in enumerate(tasks)}


# -- running statistics -------------------------------------------------------------------------


def _bn_state(rng, var):
    return {"conv.weight": rng.standard_normal((4, 3)).astype(np.float32), "bn.weight": np.ones(4, np.float32),
            "bn.running_mean": np.zeros(4, np.float32), "bn.running_var": np.full(4, var, np.float32),
            "bn.num_batches_tracked": np.array(0 if var == 1.0 else 5, np.int64)}


@pytest.fixture
def bn_suite(tmp_path):
    rng = np.random.default_rng(0)
    base = _bn_state(rng, 1.0)
    tasks = []
    for t in range(3):  # each task's variance fell by 0.4: summed, θ0 + τ_MTL = 1 - 1.2 < 0
        sd = {k: v.copy() for k, v in base.items()}
        sd["conv.weight"] += 0.01 * rng.standard_normal((4, 3)).astype(np.float32)
        sd["bn.running_var"] = np.full(4, 0.6 + 0.01 * t, np.float32)
        sd["bn.num_batches_tracked"] = np.array(5 + t, np.int64)
        tasks.append(sd)
    return _files(tmp_path, base, tasks)


def test_statistics_are_kept_per_task_by_default(bn_suite, tmp_path):
    base, tasks = bn_suite
    out = tmp_path / "b.safetensors"
    merge(MergeConfig(base, tasks, "task_arithmetic", masks="none"), out)
    b = open_bundle(out)
    from safetensors.numpy import load_file

    for t, path in tasks.items():  # each task's own statistics, bit for bit
        src = load_file(path)
        w = b.task_weights(t)
        for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            assert np.array_equal(w[k], src[k]), (t, k)
    stats = b.manifest["options"]["statistics"]
    assert stats["policy"] == "per-task"  # running_mean stayed 0 in every task: carried once
    assert stats["per_task"] == ["bn.num_batches_tracked", "bn.running_var"]
    assert {p.name: p.role for p in b.params}["bn.running_mean"] == "carried"


def test_statistics_no_task_changed_are_carried_once(tmp_path):
    """Frozen BatchNorm (the vision suite): identical in θ0 and every task, so stored once and never
    rewritten by a switch -- while the statistics a task did change stay that task's own."""
    rng = np.random.default_rng(1)
    base = _bn_state(rng, 1.0)
    tasks = []
    for t in range(2):
        sd = {k: v.copy() for k, v in base.items()}
        sd["conv.weight"] += 0.01 * rng.standard_normal((4, 3)).astype(np.float32)
        sd["bn.running_mean"] = np.full(4, 0.1 * (t + 1), np.float32)  # this one moved; the others are frozen
        tasks.append(sd)
    b, t = _files(tmp_path, base, tasks)
    merge(MergeConfig(b, t, "task_arithmetic"), tmp_path / "b.safetensors")
    bundle = open_bundle(tmp_path / "b.safetensors")
    roles = {p.name: p.role for p in bundle.params}
    assert roles["bn.running_var"] == roles["bn.num_batches_tracked"] == "carried"
    assert all(bundle.private_keys[x] == ["bn.running_mean"] for x in bundle.tasks)
    assert bundle.manifest["options"]["statistics"]["per_task"] == ["bn.running_mean"]
    assert np.array_equal(bundle.task_weights("t1")["bn.running_mean"], np.full(4, 0.2, np.float32))


def test_merged_statistics_with_an_invalid_variance_are_refused_before_writing(bn_suite, tmp_path):
    base, tasks = bn_suite
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"previous bundle")
    with pytest.raises(CheckpointError) as e:
        merge(MergeConfig(base, tasks, "task_arithmetic", masks="none", statistics="merge"), out)
    msg = str(e.value)
    assert "'bn.running_var'" in msg and "≤ 0 for a variance" in msg and "per-task" in msg and "nothing was written" in msg
    assert "task 't0'" in msg and "task 't2'" in msg
    assert out.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "base.safetensors", "t0.safetensors",
                                                          "t1.safetensors", "t2.safetensors"]


def test_statistics_policy_is_validated(bn_suite, tmp_path):
    base, tasks = bn_suite
    with pytest.raises(ConfigError, match="statistics policy 'mean' is not one of per-task, merge"):
        merge(MergeConfig(base, tasks, statistics="mean"), tmp_path / "b.safetensors")


# -- non-finite rebuilds, overflow, strict JSON -------------------------------------------------------


def test_half_precision_overflow_of_the_rebuilt_weights_is_refused(tmp_path):
    base = {"w": np.array([65000.0, 1.0], np.float16)}
    tasks = [{"w": np.array([65400.0, 1.5], np.float16)} for _ in range(3)]  # TA: 65000 + 3·400 > 65504
    b, t = _files(tmp_path, base, tasks)
    with pytest.raises(CheckpointError, match=r"task 't0', 'w': 1 rebuilt value\(s\) not finite"):
        merge(MergeConfig(b, t, "task_arithmetic", masks="none"), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_task_vector_outside_float32_is_named(tmp_path):
    base = {"w": np.array([-3e38, 0.0], np.float32), "d": np.array([1e300, 0.0])}
    tasks = [{"w": np.array([3e38, 0.0], np.float32), "d": np.array([1e300, 0.5])}]
    b, t = _files(tmp_path, base, tasks)
    with pytest.raises(CheckpointError) as e:
        merge(MergeConfig(b, t, "task_arithmetic"), tmp_path / "b.safetensors")
    msg = str(e.value)
    assert "'w': τ = θ_t − θ0 is outside the float32 range" in msg
    assert "'d'" in msg and "NaN/Inf value" not in msg  # a finite F64 is not called NaN


def test_manifest_is_strict_json(suite, tmp_path):
    base, tasks = suite
    out = tmp_path / "b.safetensors"
    merge(MergeConfig(base, tasks, "task_arithmetic", private=("head.*",), masks="none"), out)
    raw = open_bundle(out).header.metadata["edgemerge.manifest"]
    assert "NaN" not in raw and json.loads(raw)["tasks"][0]["recon_error"] is None
    with pytest.raises(FormatError, match=r"non-finite number .*; nothing was written"):
        write_bundle(tmp_path / "x.safetensors", tasks={"a": {"score": float("nan")}}, base={"w": np.ones(2, np.float32)},
                     vector={})
    assert not (tmp_path / "x.safetensors").exists()
    doc = json.loads(raw)
    doc["tasks"][0]["density"] = float("nan")
    from safetensors.numpy import load_file

    tensors = load_file(str(out))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"edgemerge.manifest": json.dumps(doc)})
    with pytest.raises(FormatError, match="NaN is not strict JSON"):
        open_bundle(tmp_path / "nan.safetensors")


# -- tied parameters ----------------------------------------------------------------------------------


def _tied_states(rng, n_tasks=3):
    emb = rng.standard_normal((11, 6)).astype(np.float32)
    base = {"emb.weight": emb, "mid.weight": rng.standard_normal((6, 6)).astype(np.float32)}
    tasks = []
    for _ in range(n_tasks):
        tasks.append({k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()})
    return base, tasks


def _torch_tied(sd):
    out = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    out["head.weight"] = out["emb.weight"]  # one tensor, two names, as torch.save keeps a tied LM head
    return out


def test_tied_torch_tensors_are_stored_and_merged_once(tmp_path):
    rng = np.random.default_rng(0)
    base, tasks = _tied_states(rng)
    (tmp_path / "pt").mkdir()
    (tmp_path / "st").mkdir()
    bp, tp = _files(tmp_path / "pt", _torch_tied(base), [_torch_tied(t) for t in tasks], fmt="torch")
    bs, ts = _files(tmp_path / "st", base, tasks)  # what save_pretrained writes: the tie dropped
    for method in ("ties", "task_arithmetic"):
        merge(MergeConfig(bp, tp, method), tmp_path / f"pt-{method}.safetensors")
        merge(MergeConfig(bs, ts, method), tmp_path / f"st-{method}.safetensors")
        a, b = open_bundle(tmp_path / f"pt-{method}.safetensors"), open_bundle(tmp_path / f"st-{method}.safetensors")
        assert a.aliases == {"head.weight": "emb.weight"} and b.aliases == {}
        assert sorted(a.header.tensors) == sorted(b.header.tensors)  # no second copy of the matrix
        for n in a.header.tensors:  # and the same TIES result: the tied matrix counted once
            assert np.array_equal(np.asarray(a._view(n)), np.asarray(b._view(n))), n


def test_explicit_tie_for_files_holding_both_copies(tmp_path):
    rng = np.random.default_rng(1)
    base, tasks = _tied_states(rng)
    both = lambda sd: {**sd, "head.weight": sd["emb.weight"].copy()}  # noqa: E731
    b, t = _files(tmp_path, both(base), [both(x) for x in tasks])
    merge(MergeConfig(b, t, "ties", ties={"head.weight": "emb.weight"}), tmp_path / "b.safetensors")
    bundle = open_bundle(tmp_path / "b.safetensors")
    assert bundle.aliases == {"head.weight": "emb.weight"} and "base/head.weight" not in bundle.header.tensors
    untied = [both(x) for x in tasks]
    untied[1]["head.weight"] = untied[1]["head.weight"] + 1
    b, t = _files(tmp_path, both(base), untied)
    with pytest.raises(CheckpointError, match=r"t1.safetensors: 'head.weight' differs from 'emb.weight'"):
        merge(MergeConfig(b, t, "ties", ties={"head.weight": "emb.weight"}), tmp_path / "c.safetensors")


class TiedLM(torch.nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.mid = torch.nn.Linear(6, 6, bias=False)
        self.head = torch.nn.Linear(6, 11, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_torch_task_model_writes_both_names_of_a_tied_tensor(tmp_path, tie, kernel):
    rng = np.random.default_rng(2)
    base, tasks = _tied_states(rng)
    bp, tp = _files(tmp_path, _torch_tied(base), [_torch_tied(t) for t in tasks], fmt="torch")
    merge(MergeConfig(bp, tp, "ties"), tmp_path / "b.safetensors")
    bundle = open_bundle(tmp_path / "b.safetensors")
    tm = TorchTaskModel(bundle, TiedLM(tie), kernel=kernel)  # strict: no false "not in the bundle"
    ids = torch.tensor([[1, 2, 3]])
    for t in bundle.tasks:
        tm.switch(t)
        w = bundle.task_weights(t)
        ref = TiedLM(True)
        ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in w.items()}, strict=False)
        assert torch.equal(tm.model.head.weight, torch.from_numpy(np.array(w["emb.weight"])))
        with torch.no_grad():
            assert torch.equal(tm(ids), ref(ids))


# -- 0-d tensors ----------------------------------------------------------------------------------------


class Scalars(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))  # a 0-d float param (CLIP's logit_scale)
        self.register_buffer("steps", torch.tensor(7))              # a 0-d integer buffer

    def forward(self, x):
        return self.fc(x) * self.temperature


@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_zero_dim_params_and_buffers(tmp_path, kernel):
    torch.manual_seed(0)
    m = Scalars()
    base = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    tasks = [{k: (np.asarray(v + np.float32(0.1 * (i + 1))) if v.dtype == np.float32 else v) for k, v in base.items()} for i in range(2)]
    b, t = _files(tmp_path, base, tasks)
    merge(MergeConfig(b, t, "task_arithmetic", masks="none"), tmp_path / "b.safetensors")
    bundle = open_bundle(tmp_path / "b.safetensors")
    assert bundle.param("temperature").shape == () and bundle.param("temperature").role == "merged"
    tm = TorchTaskModel(bundle, Scalars(), kernel=kernel)
    for task in bundle.tasks:
        tm.switch(task)
        w = bundle.task_weights(task)
        assert tm.model.temperature.shape == () and tm.model.temperature.item() == float(w["temperature"])
        assert tm.model.steps.item() == 7


# -- half precision ---------------------------------------------------------------------------------------


def test_half_precision_bundle_keeps_tau_in_theta0s_dtype(tmp_path):
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal((256, 256)).astype(np.float16)}
    tasks = [{"w": (base["w"] + 0.01 * rng.standard_normal((256, 256))).astype(np.float16)} for _ in range(3)]
    b, t = _files(tmp_path, base, tasks)
    out = tmp_path / "b.safetensors"
    merge(MergeConfig(b, t, "ties"), out)
    bundle = open_bundle(out)
    assert bundle.vector_dtype == "F16"
    n_checkpoints = sum((tmp_path / f"t{i}.safetensors").stat().st_size for i in range(3))
    assert out.stat().st_size < 0.8 * n_checkpoints  # θ0 + F16 τ + 3 masks ≈ 2.2 of 3 models
    merge(MergeConfig(b, t, "ties", vector_dtype="F32"), tmp_path / "f32.safetensors")
    assert open_bundle(tmp_path / "f32.safetensors").vector_dtype == "F32"


# -- sessions mode ------------------------------------------------------------------------------------------


def test_sessions_mode_copies_the_callers_options(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from edgemerge.export.onnx import export_onnx
    from edgemerge.runtime.session import TaskSession

    bundle = make_tiny_suite(tmp_path, heads=(3, 3, 3))
    exp = export_onnx(bundle, models.tiny, str(tmp_path), input_names=["x"], output_names=["logits"])
    seen = []
    real = ort.InferenceSession

    def spy(model, sess_options=None, **kw):
        seen.append(sess_options)
        return real(model, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    s = TaskSession(bundle, exp.plain, mode="sessions", session_options=opts)
    s.switch("t1")
    task_opts = seen[-1]
    assert task_opts is not opts
    assert task_opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert task_opts.intra_op_num_threads == 1
    assert task_opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    calls = []
    TaskSession(bundle, exp.plain, mode="sessions", session_options=lambda: calls.append(1) or ort.SessionOptions()).switch("t0")
    assert len(calls) == 2  # the probe and the task's session


def test_the_wrong_graph_for_a_mode_is_one_clear_line(tmp_path):
    pytest.importorskip("onnxruntime")
    from edgemerge.export.onnx import export_onnx
    from edgemerge.runtime.session import TaskSession

    bundle = make_tiny_suite(tmp_path)
    exp = export_onnx(bundle, models.tiny, str(tmp_path), input_names=["x"], output_names=["logits"])
    with pytest.raises(FormatError, match=r"is a switchable graph .*needs the plain graph") as e:
        TaskSession(bundle, exp.switchable, mode="sessions")
    assert "\n" not in str(e.value)
    with pytest.raises(FormatError, match=r"none of its weights as graph inputs .*needs the switchable graph") as e:
        TaskSession(bundle, exp.plain, mode="inputs")
    assert "\n" not in str(e.value)


def test_text_graphs_take_any_batch_and_sequence_length(tmp_path):
    """The exported graphs' batch and sequence dims are dynamic by default (issue 13, item 10)."""
    pytest.importorskip("onnxruntime")
    import matrix
    from edgemerge.runtime.session import TaskSession

    for arch_name in ("bert", "gpt2"):
        arch = matrix.ARCHS[arch_name]
        suite = matrix.build_suite(arch, "fp32", tmp_path / arch_name)
        exported = matrix.export_suite(suite, matrix.merge_cell(suite, "ties", "safetensors"))
        bundle = open_bundle(suite.root / "bundles" / "ties.safetensors.safetensors")
        for mode, graph in (("inputs", exported["switchable"]), ("sessions", exported["plain"])):
            s = TaskSession(bundle, graph, mode=mode)
            for batch, seq in ((2, 7), (3, 11), (1, 3)):
                ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seq))
                mask = torch.ones(batch, seq, dtype=torch.int32)  # int32: widened to the graph's int64
                model = matrix.model_with(arch, "fp32", bundle.task_weights("t1"))
                with torch.no_grad():
                    ref = model(ids, mask.long()).numpy()
                (y,) = s.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, task="t1")
                assert y.shape == ref.shape and matrix.relative(y, ref) <= 1e-5, (arch_name, mode, batch, seq)
        with pytest.raises(ConfigError, match=r"input 'input_ids' is float32, the graph takes int64"):
            s.run({"input_ids": np.zeros((1, 4), np.float32), "attention_mask": np.ones((1, 4), np.int64)})


def test_a_missing_graph_is_not_blamed_on_half_precision_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import make_suite
    from edgemerge.errors import BackendError
    from edgemerge.runtime.session import TaskSession

    base, tasks = make_suite(tmp_path, dtype=np.float16)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    with pytest.raises(BackendError, match="could not load the model") as e:
        TaskSession(str(tmp_path / "b.safetensors"), str(tmp_path / "missing.onnx"))
    assert "kernel" not in str(e.value)
