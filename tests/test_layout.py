"""The switchable graph's fast GEMM layout (issue 16): structure, exact feeds, torch-equal outputs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from edgemerge.errors import FormatError  # noqa: E402
from edgemerge.export.onnx import export_onnx  # noqa: E402
from edgemerge.io import write_safetensors  # noqa: E402
from edgemerge.pipeline import MergeConfig, merge  # noqa: E402
from edgemerge.runtime import open_bundle  # noqa: E402
from edgemerge.runtime.session import ALTERNATE_KEY, TRANSPOSED_KEY, TaskSession  # noqa: E402


class Layouts(torch.nn.Module):
    """Every GEMM form an exporter writes: Conv1D (x @ W, W as [K, N]) on 3-D activations, a
    Linear on 3-D (MatMul(x, Transpose(W))), a Linear on 2-D (Gemm transB=1), a private head used
    as ``x @ head`` on 2-D, a weight used as ``x @ W`` on 3-D, and an embedding also read as an
    output projection (two kinds of reader: left alone)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = torch.nn.Embedding(11, 8)
        self.c1 = Conv1D(16, 8)
        self.lin = torch.nn.Linear(16, 16)
        self.flat = torch.nn.Linear(16, 16)
        self.head = torch.nn.Parameter(torch.randn(16, 3) * 0.3)
        self.proj = torch.nn.Parameter(torch.randn(16, 16) * 0.3)
        self.pb = torch.nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, ids):
        h = self.emb(ids)
        tokens = torch.nn.functional.linear(h, self.emb.weight)
        x = torch.relu(self.c1(h))
        x = torch.tanh(self.lin(x))
        x = torch.relu(x @ self.proj + self.pb)  # 3-D: reshaped around a Gemm, pb folded into C
        return self.flat(x.mean(1)) @ self.head, tokens


def layouts(task, shapes):
    return Layouts(), (torch.zeros(2, 5, dtype=torch.long),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    torch.manual_seed(0)
    base = Layouts()
    sd = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    write_safetensors(d / "base.safetensors", {k: v for k, v in sd.items() if k != "head"}, checksums=False)
    rng = np.random.default_rng(0)
    tasks = {}
    for t in range(3):
        path = d / f"t{t}.safetensors"
        write_safetensors(path, {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in sd.items()},
                          checksums=False)
        tasks[f"t{t}"] = str(path)
    merge(MergeConfig(str(d / "base.safetensors"), tasks, "task_arithmetic", masks="tall", private=("head",)),
          d / "bundle.safetensors")
    bundle = open_bundle(d / "bundle.safetensors")
    fast = export_onnx(bundle, layouts, str(d / "fast"), input_names=["ids"], output_names=["y", "tokens"])
    plain = export_onnx(bundle, layouts, str(d / "exporter"), input_names=["ids"], output_names=["y", "tokens"],
                        layout="exporter")
    few = export_onnx(bundle, layouts, str(d / "few"), input_names=["ids"], output_names=["y", "tokens"], layout="few-rows")
    return bundle, fast, plain, few


def test_gemm_weights_are_fed_as_n_by_k(exported):
    bundle, fast, plain, _ = exported
    assert sorted(fast.transposed) == ["c1.weight", "head", "proj"] and plain.transposed == []
    g = onnx.load(fast.switchable).graph
    meta = {p.key: p.value for p in onnx.load(fast.switchable).metadata_props}
    assert sorted(json.loads(meta[TRANSPOSED_KEY])) == ["c1.weight", "head", "proj"]
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["c1.weight"] == [16, 8] and dims["head"] == [3, 16] and dims["lin.weight"] == [16, 16]
    readers = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, i, {a.name: a.i for a in node.attribute}))
    for w in ("c1.weight", "flat.weight", "head", "proj"):
        assert [(op, i, attrs.get("transB")) for op, i, attrs in readers[w]] == [("Gemm", 1, 1)], w
    assert readers["c1.bias"][0][0] == "Gemm"  # c1's bias is Gemm's C, as the exporter wrote it
    assert [(op, i) for op, i, _ in readers["pb"]] == [("Gemm", 2)]  # the Add after x @ proj folded into C
    assert [op for op, _, _ in readers["lin.weight"]] == ["Transpose"]  # MatMul(x, Transpose(W)): measured, kept
    assert sorted(op for op, _, _ in readers["emb.weight"]) == ["Gather", "Transpose"]  # two kinds of reader: kept
    exporter = onnx.load(plain.switchable).graph
    ops = {i.name: n.op_type for n in exporter.node for i in [*exporter.input] if i.name in n.input}
    assert ops["head"] == ops["proj"] == "MatMul" and ops["c1.weight"] == "Gemm"


def _torch(bundle, task, ids):
    m = Layouts()
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in bundle.task_weights(task).items()})
    with torch.no_grad():
        return [t.numpy() for t in m(torch.from_numpy(ids))]


def test_outputs_match_torch_and_the_exporter_layout(exported):
    bundle, fast, plain, _ = exported
    ids = np.array([[1, 2, 3, 4, 5, 6, 7], [10, 0, 9, 8, 7, 6, 5]], dtype=np.int64)
    s_fast, s_plain = TaskSession(bundle, fast.switchable), TaskSession(bundle, plain.switchable)
    for task in ("t2", "t0", "t1", "t0"):
        want = _torch(bundle, task, ids)
        got_fast, got_plain = s_fast.run(ids, task=task), s_plain.run(ids, task=task)
        for w, a, b in zip(want, got_fast, got_plain):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-6)
        weights = bundle.task_weights(task)
        fed = s_fast._buffers["c1.weight"]  # exactly θ_t's bytes, transposed
        assert fed.flags.c_contiguous and fed.tobytes() == np.ascontiguousarray(np.asarray(weights["c1.weight"]).T).tobytes()
        assert s_fast._buffers["proj"].tobytes() == np.ascontiguousarray(np.asarray(weights["proj"]).T).tobytes()
        assert s_fast._values["head"].numpy().tobytes() == np.ascontiguousarray(np.asarray(weights["head"]).T).tobytes()


def test_resident_bytes_count_the_transposed_copies(exported):
    bundle, fast, plain, _ = exported
    s_fast, s_plain = TaskSession(bundle, fast.switchable), TaskSession(bundle, plain.switchable)
    buffers = sum(p.numel * 4 for p in bundle.params)  # every managed weight is float32 here
    assert s_plain.resident_bytes() == {"weight buffers": buffers, "transposed copies": 0}
    for t in ("t0", "t1"):
        s_fast.switch(t)
    # θ0 and τ of c1.weight (8×16) and proj (16×16), float32; one permuted mask per task switched to
    assert s_fast.resident_bytes() == {"weight buffers": buffers, "transposed copies": 2 * 4 * (128 + 256) + 2 * (16 + 32)}


def _with_meta(src: str, dst, value: str) -> str:
    m = onnx.load(src)
    for p in m.metadata_props:
        if p.key == TRANSPOSED_KEY:
            p.value = value
    onnx.save(m, str(dst))
    return str(dst)


def test_bad_transposed_metadata_is_refused(exported, tmp_path):
    bundle, fast, _, _ = exported
    for value, message in (('["c1.weight", "nope"]', "'nope' is listed as transposed but is not a graph weight"),
                           ('["c1.weight", "head", "lin.bias"]', "'lin.bias' is listed as transposed but has shape \\[16\\]"),
                           ('["c1.weight"]', "weight 'head': graph has F32 \\[3, 16\\], bundle task 't0' has F32 \\[16, 3\\]"),
                           ('{"c1.weight": 1}', "must be a list of weight names")):
        with pytest.raises(FormatError, match=message):
            TaskSession(bundle, _with_meta(fast.switchable, tmp_path / "bad.onnx", value))


def test_few_rows_puts_every_weight_on_the_left(exported):
    """layout='few-rows': each GEMM over a weight input reads it as MatMul's first operand, fed
    exactly as the fast layout feeds it; its other readers (the embedding's Gather) are left."""
    bundle, fast, _, few = exported
    assert few.transposed == fast.transposed
    g = onnx.load(few.switchable).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims == {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(fast.switchable).graph.input}
    readers = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, i))
    for w in ("c1.weight", "lin.weight", "flat.weight", "head", "proj"):
        assert readers[w] == [("MatMul", 0)], w
    assert sorted(readers["emb.weight"]) == [("Gather", 0), ("MatMul", 0)]
    assert not any(n.op_type == "Gemm" for n in g.node)


def test_few_rows_outputs_match_torch(exported):
    bundle, fast, _, few = exported
    s_few, s_fast = TaskSession(bundle, few.switchable), TaskSession(bundle, fast.switchable)
    for ids in (np.array([[1, 2, 3, 4, 5, 6, 7], [10, 0, 9, 8, 7, 6, 5]], np.int64), np.array([[4]], np.int64)):
        for task in ("t1", "t0", "t2"):
            want = _torch(bundle, task, ids)
            for w, a, b in zip(want, s_few.run(ids, task=task), s_fast.run(ids, task=task)):
                np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            assert s_few._buffers["c1.weight"].tobytes() == s_fast._buffers["c1.weight"].tobytes()


@pytest.fixture(scope="module")
def auto(exported, tmp_path_factory):
    bundle = exported[0]
    return export_onnx(bundle, layouts, str(tmp_path_factory.mktemp("auto")), input_names=["ids"],
                       output_names=["y", "tokens"], layout="auto")


def test_auto_writes_the_fast_graph_and_names_the_few_rows_one(exported, auto):
    """layout='auto': the switchable graph is the fast layout's, plus the few-rows graph beside it
    under the name its metadata gives."""
    _, fast, _, few = exported
    meta = {p.key: p.value for p in onnx.load(auto.switchable).metadata_props}
    assert meta[ALTERNATE_KEY] == "model.few-rows.onnx" and auto.alternate.endswith("model.few-rows.onnx")
    assert onnx.load(auto.switchable).graph == onnx.load(fast.switchable).graph
    assert onnx.load(auto.alternate).graph == onnx.load(few.switchable).graph
    assert ALTERNATE_KEY not in {p.key for p in onnx.load(auto.alternate).metadata_props}
    assert auto.transposed == fast.transposed


def test_auto_runs_one_of_the_two_graphs_per_shape_and_matches_torch(exported, auto):
    bundle = exported[0]
    s = TaskSession(bundle, auto.switchable)
    only_fast, only_few = TaskSession(bundle, auto.switchable, alternate=False), TaskSession(bundle, auto.alternate)
    batches = (np.array([[1, 2, 3, 4, 5, 6, 7], [10, 0, 9, 8, 7, 6, 5]], np.int64), np.array([[4]], np.int64),
               np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int64))  # [2, 5] shares [2, 7]'s timing: both round to [2, 8]
    assert s.layout(batches[0]) is None  # not timed before its first call
    for task in ("t1", "t0", "t2"):
        for ids in batches:
            got = s.run(ids, task=task)
            for w, a in zip(_torch(bundle, task, ids), got):
                np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
            ran = s.layout(ids)
            assert ran == s.layouts()[(("ids", tuple(1 << (d - 1).bit_length() for d in ids.shape)),)]
            other = only_fast if ran == auto.switchable else only_few
            assert ran in (auto.switchable, auto.alternate)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(got, other.run(ids, task=task)))  # that graph, bit for bit
    assert sorted(s.layouts()) == [(("ids", (1, 1)),), (("ids", (2, 8)),)]
    only_fast.run(batches[0], task="t0")
    assert set(only_fast.layouts().values()) == {auto.switchable}


def test_auto_picks_the_faster_graph(exported, auto, monkeypatch):
    """The choice follows the timing: the graph made slow is the one not chosen."""
    import time

    s = TaskSession(exported[0], auto.switchable)
    s.switch("t0")
    run = s._run_graph
    for slow, shape in ((0, (1, 3)), (1, (1, 9))):
        monkeypatch.setattr(s, "_run_graph", lambda i, x, slow=slow: (time.sleep(0.01) if i == slow else None, run(i, x))[1])
        s.run(np.ones(shape, np.int64))
        assert s.layout(np.ones(shape, np.int64)) == s._graphs[1 - slow][0]


def test_auto_refuses_a_missing_or_different_alternate(exported, auto, tmp_path):
    bundle, _, plain, _ = exported
    import shutil

    shutil.copy(auto.switchable, tmp_path / "model.switchable.onnx")
    with pytest.raises(FormatError, match="names 'model.few-rows.onnx' as its few-rows graph and .* is not there"):
        TaskSession(bundle, str(tmp_path / "model.switchable.onnx"))
    TaskSession(bundle, str(tmp_path / "model.switchable.onnx"), alternate=False)  # the fast graph alone still serves
    shutil.copy(plain.switchable, tmp_path / "model.few-rows.onnx")  # the exporter layout: other feeds
    with pytest.raises(FormatError, match="does not take the same weights and inputs as"):
        TaskSession(bundle, str(tmp_path / "model.switchable.onnx"))
