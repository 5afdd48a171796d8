"""ONNX export + TaskSession: ONNX Runtime outputs vs the torch forward of θ_t, for every task."""

import json
import random
import threading
import time

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgemerge.errors import FormatError, TaskError  # noqa: E402
from edgemerge.export.onnx import export_onnx  # noqa: E402
from edgemerge.io import write_safetensors  # noqa: E402
from edgemerge.pipeline import MergeConfig, merge  # noqa: E402
from edgemerge.runtime import open_bundle  # noqa: E402
from edgemerge.runtime.session import TaskSession  # noqa: E402

import models  # noqa: E402
from models import make_tiny_suite, torch_forward  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    bundle = make_tiny_suite(d)
    exp = export_onnx(bundle, models.tiny, str(d), input_names=["x"], output_names=["logits"])
    return bundle, exp, d


def test_switchable_graph_names_weights_like_the_state_dict(exported):
    bundle, exp, _ = exported
    g = onnx.load(exp.switchable).graph
    inputs = [i.name for i in g.input]
    assert inputs[0] == "x"
    assert set(inputs[1:]) == {"enc.0.weight", "enc.0.bias", "enc.2.weight", "enc.2.bias", "norm.weight", "norm.bias",
                               "head.weight", "head.bias"}
    assert not [i.name for i in g.initializer if i.name in inputs]
    assert exp.unused == []
    meta = {p.key: p.value for p in onnx.load(exp.plain).metadata_props}
    assert meta["edgemerge.base_id"] == bundle.base_id and set(json.loads(meta["edgemerge.weights"])) == set(inputs[1:])


def test_every_task_matches_torch(exported):
    bundle, exp, _ = exported
    s = TaskSession(bundle, exp.switchable)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    for task in ["t2", "t0", "t1", "t0"]:  # switching back and forth never accumulates drift
        s.switch(task)
        (y,) = s.run({"x": x})
        ref = torch_forward(bundle, task, x)
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= 1e-4, task


def test_sessions_mode_matches_torch(tmp_path):
    bundle = make_tiny_suite(tmp_path, heads=(3, 3, 3))
    exp = export_onnx(bundle, models.tiny, str(tmp_path), input_names=["x"], output_names=["logits"])
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    fast = TaskSession(bundle, exp.switchable, mode="inputs")
    per = TaskSession(bundle, exp.plain, mode="sessions")
    for task in bundle.tasks:
        ref = torch_forward(bundle, task, x)
        assert np.abs(per.run(x, task=task)[0] - ref).max() <= 1e-4
        assert np.abs(fast.run(x, task=task)[0] - ref).max() <= 1e-4


def test_plain_export_with_a_task_baked_in(exported, tmp_path):
    bundle, _, _ = exported
    exp = export_onnx(bundle, models.tiny, str(tmp_path), task="t1", switchable=False, input_names=["x"])
    import onnxruntime as ort

    x = np.ones((3, 8), np.float32)
    y = ort.InferenceSession(exp.plain).run(None, {"x": x})[0]
    assert np.abs(y - torch_forward(bundle, "t1", x)).max() <= 1e-4


def test_unknown_task_lists_valid_ones(exported):
    bundle, exp, _ = exported
    s = TaskSession(bundle, exp.switchable)
    with pytest.raises(TaskError, match="unknown task 'nope'; valid: t0, t1, t2"):
        s.switch("nope")


def test_bundle_from_another_base_is_refused_before_any_work(exported, tmp_path):
    _, exp, _ = exported
    other = make_tiny_suite(tmp_path, seed=5)
    with pytest.raises(FormatError, match="exported from another base model"):
        TaskSession(other, exp.switchable)


def test_graph_mismatch_lists_every_problem(exported, tmp_path):
    bundle, _, _ = exported  # heads 2, 3, 4 classes
    fixed = make_tiny_suite(tmp_path, heads=(3, 3, 3))  # same θ0, every head 3 classes
    exp = export_onnx(fixed, models.tiny, str(tmp_path), input_names=["x"])
    with pytest.raises(FormatError) as exc:
        TaskSession(bundle, exp.switchable)
    msg = str(exc.value)
    assert "does not match" in msg
    assert "weight 'head.weight': graph has F32 [3, 16], bundle task 't0' has F32 [2, 16]" in msg
    assert "weight 'head.bias': graph has F32 [3], bundle task 't2' has F32 [4]" in msg


def test_concurrent_runs_never_see_torn_weights(exported):
    bundle, exp, _ = exported
    s = TaskSession(bundle, exp.switchable)
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    refs = {t: torch_forward(bundle, t, x) for t in bundle.tasks}
    errors = []
    stop = threading.Event()

    def runner(seed):
        rnd = random.Random(seed)
        for _ in range(60):
            t = rnd.choice(bundle.tasks)
            y = s.run(x, task=t)[0]
            if y.shape != refs[t].shape or np.abs(y - refs[t]).max() > 1e-4:
                errors.append(t)

    def switcher():
        i = 0
        while not stop.is_set():
            s.switch(bundle.tasks[i % 3])

            i += 1

    sw = threading.Thread(target=switcher)
    sw.start()
    runners = [threading.Thread(target=runner, args=(k,)) for k in range(4)]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    stop.set()
    sw.join()
    assert errors == []


def test_cli_export_run_bench(exported, tmp_path):
    import os
    import subprocess
    import sys

    bundle, _, _ = exported
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "edgemerge.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    out = cli("export", "onnx", bundle.path, "--model", "models:tiny", "-o", tmp_path, "--input-name", "x", "--output-name",
              "logits", "--layout", "auto")
    assert f"few-rows graph → {tmp_path / 'model.few-rows.onnx'} (same feeds" in " ".join(out.split()) and (tmp_path / "model.few-rows.onnx").is_file()
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"not to be written through a link")
    (tmp_path / "y.npy").symlink_to(victim)
    cli("run", bundle.path, "--onnx", tmp_path / "model.switchable.onnx", "--task", "t1", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert victim.read_bytes() == b"not to be written through a link" and not (tmp_path / "y.npy").is_symlink()
    assert np.abs(np.load(tmp_path / "y.npy") - torch_forward(bundle, "t1", x)).max() <= 1e-4
    res = json.loads(cli("bench", bundle.path, "--onnx", tmp_path / "model.switchable.onnx", "--input", tmp_path / "x.npy", "--json", "--rounds", "2"))
    assert res["switches"] == 6 and res["runs"] == 30 and res["switch_p50_ms"] > 0 and res["peak_rss_bytes"] > 0
    from edgemerge.runtime.kernel import kernel_name

    assert res["kernel"] == f"{kernel_name()} (F32)"  # the subprocess runs the same install; per θ0 dtype


def test_identical_initializers_stay_separate_weights(tmp_path):
    """The exporter merges byte-identical initializers; tasks that differ there must still switch right."""
    torch.manual_seed(0)
    base = models.Twin()
    with torch.no_grad():
        base.fc.bias.zero_()
    sd = {k: v.numpy().copy() for k, v in base.state_dict().items()}
    write_safetensors(tmp_path / "base.safetensors", sd, checksums=False)
    tasks = {}
    for t in range(2):
        w = {k: v + np.float32(0.1 * (t + 1)) * np.random.default_rng(t).standard_normal(v.shape).astype(np.float32)
             for k, v in sd.items()}
        write_safetensors(tmp_path / f"t{t}.safetensors", w, checksums=False)
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "task_arithmetic"), tmp_path / "b.safetensors")
    bundle = open_bundle(tmp_path / "b.safetensors")
    exp = export_onnx(bundle, models.twin, str(tmp_path), input_names=["x"])
    assert exp.unused == [] and set(exp.weights) == set(sd)
    plain = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(exp.plain).graph.initializer}
    assert all(np.array_equal(plain[k], bundle.base(k)) for k in sd)  # exact θ0 restored after the export
    x = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    s = TaskSession(bundle, exp.switchable)
    for t in bundle.tasks:
        w = bundle.task_weights(t)
        m = models.Twin()
        m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in w.items()})
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy()
        assert np.abs(s.run(x, task=t)[0] - ref).max() <= 1e-5
