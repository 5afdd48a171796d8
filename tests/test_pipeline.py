"""The streaming merge against a plain torch implementation of the reference algorithms."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from edgemerge.errors import CheckpointError, ConfigError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle

from conftest import make_suite

LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


def flat(sds, keys):
    return torch.stack([torch.cat([torch.from_numpy(np.asarray(sd[k], np.float32)).reshape(-1) for k in keys]) for sd in sds])


def load(path):
    from safetensors.numpy import load_file
    return load_file(path)


def reference_ties(tv: torch.Tensor, density: float, aggregate="mean") -> torch.Tensor:
    """TIES as the reference code does it: per-task global top-k, sign by mass, majority for ties."""
    d = tv.shape[1]
    k = d - int(d * density)
    kth = tv.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if aggregate == "sum":
        return sel.sum(0)
    return sel.sum(0) / torch.clamp((sel != 0).sum(0).float(), min=1)


def bundle_flat(b, what, keys, task=None):
    parts = []
    for k in keys:
        arr = b.vector(k) if what == "vector" else b.mask(task, k)
        parts.append(torch.from_numpy(np.asarray(arr, np.float32).copy()).reshape(-1))
    return torch.cat(parts)


@pytest.fixture
def big_suite(tmp_path):
    """Tensors larger than the chunk size used below, so chunk boundaries are exercised."""
    rng = np.random.default_rng(3)
    base = {"a.weight": rng.standard_normal((70, 50)).astype(np.float32),
            "a.bias": rng.standard_normal(70).astype(np.float32),
            "b.weight": rng.standard_normal((33, 70)).astype(np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for t in range(4):
        sd = {k: v + (0.02 * rng.standard_normal(v.shape) * (rng.random(v.shape) < 0.5)).astype(np.float32) for k, v in base.items()}
        save_file(sd, str(tmp_path / f"t{t}.safetensors"))
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    return str(tmp_path / "base.safetensors"), tasks


@pytest.mark.parametrize("chunk", [1024, 1 << 22])
def test_ties_and_tall_match_reference(big_suite, tmp_path, chunk):
    base, tasks = big_suite
    out = tmp_path / "b.safetensors"
    report = merge(MergeConfig(base, tasks, "ties", {"density": 0.3}, chunk_elems=chunk), out)
    b = open_bundle(out)
    keys = [p.name for p in b.params]
    assert keys == sorted(keys)
    theta0 = flat([load(base)], keys)[0]
    tv = flat([load(p) for p in tasks.values()], keys) - theta0
    expect = reference_ties(tv, 0.3)
    got = bundle_flat(b, "vector", keys)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    for i, (name, r) in enumerate(zip(tasks, report.tasks)):
        mask = bundle_flat(b, "mask", keys, name).bool()
        ref = tv[i].abs() > torch.tensor(r.lam, dtype=torch.float32) * (got - tv[i]).abs()
        assert torch.equal(mask, ref), name
        assert r.density == pytest.approx(ref.float().mean().item())
        err = torch.linalg.vector_norm(torch.where(ref, got, 0) - tv[i]).item()
        assert r.error == pytest.approx(err, rel=1e-5)


def test_chunking_does_not_change_the_data(big_suite, tmp_path):
    base, tasks = big_suite
    for method in ("ties", "breadcrumbs", "dare", "consensus_ta"):
        merge(MergeConfig(base, tasks, method, chunk_elems=1024), tmp_path / "small.safetensors")
        merge(MergeConfig(base, tasks, method, chunk_elems=1 << 22), tmp_path / "big.safetensors")
        small, big = open_bundle(tmp_path / "small.safetensors"), open_bundle(tmp_path / "big.safetensors")
        assert small.checksums == big.checksums, method  # every tensor's bytes are identical
        for a, b in zip(small.manifest["tasks"], big.manifest["tasks"]):
            # the float64 error sums are associated differently per chunk: equal to rounding only
            assert a.pop("recon_error") == pytest.approx(b.pop("recon_error"), rel=1e-9) and a == b
        merge(MergeConfig(base, tasks, method, chunk_elems=1024), tmp_path / "again.safetensors")
        assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "small.safetensors").read_bytes(), method


def test_sign_tie_uses_global_majority(tmp_path):
    # param 'w': position 0 is an exact tie (+1 vs -1); 'v': three positive elections -> majority +
    base = {"v": np.zeros(3, np.float32), "w": np.zeros(1, np.float32)}
    t1 = {"v": np.array([1, 1, 1], np.float32), "w": np.array([1], np.float32)}
    t2 = {"v": np.array([1, 1, 1], np.float32), "w": np.array([-1], np.float32)}
    for name, sd in (("base", base), ("t1", t1), ("t2", t2)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    tasks = {"t1": str(tmp_path / "t1.safetensors"), "t2": str(tmp_path / "t2.safetensors")}
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "ties", {"density": 0.99}), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    assert b.vector("w").tolist() == [1.0]  # positive majority selects the +1 entry
    expect = reference_ties(torch.tensor([[1, 1, 1, 1], [1, 1, 1, -1]], dtype=torch.float32), 0.99)
    assert expect[3].item() == 1.0
    # the masks were rebuilt for the flipped value: task t1 agrees with +1, t2 does not
    assert b.mask("t1", "w").tolist() == [True] and b.mask("t2", "w").tolist() == [False]


def test_rebuilt_weights_are_select_of_stored_tensors(suite, tmp_path):
    base, tasks = suite
    merge(MergeConfig(base, tasks, "task_arithmetic", private=("head.*",)), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    for t in b.tasks:
        w = b.task_weights(t)
        for p in b.params:
            if p.role == "merged":
                exp = np.where(b.mask(t, p.name), b.base(p.name) + b.vector(p.name), b.base(p.name))
                assert w[p.name].tobytes() == exp.astype(np.float32).tobytes()
        assert w["norm.num_batches_tracked"].tolist() == 7
        assert np.array_equal(w["head.weight"], load(tasks[t])["head.weight"])


def test_task_arithmetic_vector_and_carried_buffers(suite, tmp_path):
    base, tasks = suite
    merge(MergeConfig(base, tasks, "task_arithmetic", {"scale": 0.3}, private=("head.*",)), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    sds = [load(p) for p in tasks.values()]
    b0 = load(base)
    exp = np.float32(0.3) * sum((sd["enc.0.weight"] - b0["enc.0.weight"]) for sd in sds)
    np.testing.assert_allclose(b.vector("enc.0.weight"), exp, rtol=1e-6, atol=1e-8)
    # BatchNorm's step count, the same in every task: carried once, with either statistics policy
    assert {p.name: p.role for p in b.params}["norm.num_batches_tracked"] == "carried"
    merge(MergeConfig(base, tasks, "task_arithmetic", statistics="merge", private=("head.*",)), tmp_path / "m.safetensors")
    assert {p.name: p.role for p in open_bundle(tmp_path / "m.safetensors").params}["norm.num_batches_tracked"] == "carried"


def test_params_no_task_changed_are_carried(tmp_path):
    """A frozen tensor (same bytes in every task) and one the method empties are stored as θ0 only."""
    rng = np.random.default_rng(5)
    base = {"emb": rng.standard_normal((40, 8)).astype(np.float32), "w": rng.standard_normal((6, 8)).astype(np.float32),
            "v": np.zeros(2, np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = {}
    for i, sign in enumerate((1, -1)):  # 'v' moves by +1 in one task and -1 in the other: TA sums it to 0
        sd = {"emb": base["emb"], "w": base["w"] + rng.standard_normal((6, 8)).astype(np.float32) * 0.1,
              "v": np.full(2, sign, np.float32)}
        save_file(sd, str(tmp_path / f"t{i}.safetensors"))
        tasks[f"t{i}"] = str(tmp_path / f"t{i}.safetensors")
    report = merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "task_arithmetic"), tmp_path / "b.safetensors")
    assert (report.n_params, report.n_unchanged) == (48, 320 + 2)
    with open_bundle(tmp_path / "b.safetensors") as b:
        assert {p.name: p.role for p in b.params} == {"emb": "carried", "v": "carried", "w": "merged"}
        from safetensors import safe_open
        with safe_open(str(tmp_path / "b.safetensors"), "np") as f:
            assert sorted(f.keys()) == ["base/emb", "base/v", "base/w", "mask/t0/w", "mask/t1/w", "vector/w"]
        for t, r in zip(tasks, report.tasks):  # density: of the mask bits the bundle stores
            assert r.density == b.mask(t, "w").mean() == b.manifest["tasks"][int(t[1])]["density"]
            w = b.task_weights(t)
            assert w["emb"].tobytes() == base["emb"].tobytes() and w["v"].tolist() == [0.0, 0.0]
            assert w["w"].tobytes() == np.where(b.mask(t, "w"), base["w"] + b.vector("w"), base["w"]).tobytes()


def test_consensus_keeps_entries_in_k_masks(big_suite, tmp_path):
    base, tasks = big_suite
    merge(MergeConfig(base, tasks, "task_arithmetic", masks="tall"), tmp_path / "ta.safetensors")
    merge(MergeConfig(base, tasks, "consensus_ta", {"k": 2}), tmp_path / "c.safetensors")
    ta, c = open_bundle(tmp_path / "ta.safetensors"), open_bundle(tmp_path / "c.safetensors")
    for p in ta.params:
        votes = sum(ta.mask(t, p.name).astype(int) for t in ta.tasks)
        assert np.array_equal(c.vector(p.name), np.where(votes >= 2, ta.vector(p.name), 0)), p.name


def test_consensus_without_bundle_masks_is_one_merged_model(big_suite, tmp_path):
    base, tasks = big_suite
    merge(MergeConfig(base, tasks, "consensus_ta"), tmp_path / "c.safetensors")
    merge(MergeConfig(base, tasks, "consensus_ta", masks="none"), tmp_path / "n.safetensors")
    c, n = open_bundle(tmp_path / "c.safetensors"), open_bundle(tmp_path / "n.safetensors")
    assert n.mask_policy == "none" and [t["lambda"] for t in n.manifest["tasks"]] == [None] * 4
    for p in c.params:
        assert np.array_equal(c.vector(p.name), n.vector(p.name))


def test_validation_score_chooses_lambda(suite, tmp_path):
    base, tasks = suite
    seen = []

    def score(task, lam, weights):
        seen.append((task, lam, sorted(weights)))
        return -abs(lam - (0.3 if task == "task0" else 0.5))

    r = merge(MergeConfig(base, tasks, "ties", private=("head.*",)), tmp_path / "b.safetensors", score=score)
    assert [t.lam for t in r.tasks] == [0.3, 0.5, 0.5]
    assert len(seen) == 15 and "head.weight" in seen[0][2]
    b = open_bundle(tmp_path / "b.safetensors")
    assert b.manifest["mask"]["selection"] == "validation"


def test_validation_score_that_is_not_a_number_is_refused(suite, tmp_path):
    """The λ search refuses a score that is no finite number (as the codec selector does), naming
    the task and λ, and writes nothing; None used to escape as a TypeError."""
    base, tasks = suite
    for bad in (float("nan"), None):
        out = tmp_path / "b.safetensors"
        with pytest.raises(ConfigError, match=rf"score for task 'task0' at λ=\S+ is {bad!r}; it must be a finite number"):
            merge(MergeConfig(base, tasks, "ties", private=("head.*",)), out, score=lambda task, lam, w: bad)
        assert not out.exists()


def test_reconstruction_default_picks_largest_lambda_below_one(suite, tmp_path):
    base, tasks = suite
    r = merge(MergeConfig(base, tasks, "ties", private=("head.*",)), tmp_path / "b.safetensors")
    for t in r.tasks:
        assert t.lam == 0.6 and t.errors == sorted(t.errors, reverse=True)


def test_half_precision_vector(suite, tmp_path):
    base, tasks = suite
    merge(MergeConfig(base, tasks, "task_arithmetic", private=("head.*",), vector_dtype="F16"), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    v = b.vector("enc.0.weight")
    assert v.dtype == np.float16
    r = b.task_weights("task1")["enc.0.weight"]
    m = b.mask("task1", "enc.0.weight")
    assert np.array_equal(r, np.where(m, b.base("enc.0.weight") + v.astype(np.float32), b.base("enc.0.weight")))


def test_no_masks_policy(suite, tmp_path):
    base, tasks = suite
    merge(MergeConfig(base, tasks, "task_arithmetic", {"scale": 0.4}, masks="none", private=("head.*",)), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    assert b.mask_policy == "none" and not [n for n in b.header.tensors if n.startswith("mask/")]
    w = b.task_weights("task0")["enc.0.weight"]
    assert np.array_equal(w, b.base("enc.0.weight") + b.vector("enc.0.weight"))


def test_every_problem_reported_at_once(tmp_path):
    base, tasks = make_suite(tmp_path, n_tasks=2)
    bad = load(tasks["task1"])
    bad.pop("enc.0.bias")
    bad["enc.1.weight"] = bad["enc.1.weight"][:5]
    bad["enc.0.weight"] = bad["enc.0.weight"].astype(np.float16)
    bad["extra"] = np.zeros(2, np.float32)
    save_file(bad, tasks["task1"])
    other = load(tasks["task0"])
    other["enc.1.weight"][0, 0] = np.nan  # reported with the key and shape problems, not after they are fixed
    save_file(other, tasks["task0"])
    with pytest.raises(CheckpointError) as exc:
        merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    msg = str(exc.value)
    assert msg.startswith("5 problem(s)")
    for needle in ["lacks 'enc.0.bias'", "'extra', which the base lacks", "'enc.1.weight' has shape [5, 48], base has [33, 48]",
                   "'enc.0.weight' is F16, base is F32", tasks["task1"], f"{tasks['task0']}: 'enc.1.weight' has 1 NaN/Inf"]:
        assert needle in msg
    assert not (tmp_path / "b.safetensors").exists()


def test_nonfinite_values_reported_for_every_tensor(tmp_path):
    base, tasks = make_suite(tmp_path, n_tasks=2)
    for t, key in (("task0", "enc.0.bias"), ("task1", "enc.1.weight")):
        sd = load(tasks[t])
        sd[key].reshape(-1)[3] = np.nan if t == "task0" else np.inf
        save_file(sd, tasks[t])
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold NaN/Inf") as exc:
        merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    assert "'enc.0.bias' has 1 NaN/Inf" in str(exc.value) and "'enc.1.weight' has 1" in str(exc.value)
    assert not (tmp_path / "b.safetensors").exists()


def test_config_errors(suite, tmp_path):
    base, tasks = suite
    with pytest.raises(ConfigError, match="matches no tensor"):
        merge(MergeConfig(base, tasks, private=("nothing.*", "head.*")), tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match="TALL λ grid"):
        merge(MergeConfig(base, tasks, lambdas=(0.5, 0.2)), tmp_path / "b.safetensors")
    with pytest.raises(Exception, match="task name 'a/b' is not allowed"):
        merge(MergeConfig(base, {"a/b": tasks["task0"]}), tmp_path / "b.safetensors")


def test_inputs_are_not_modified(suite, tmp_path):
    base, tasks = suite
    before = {p: open(p, "rb").read() for p in [base, *tasks.values()]}
    merge(MergeConfig(base, tasks, "dare_ties", private=("head.*",)), tmp_path / "b.safetensors")
    assert all(open(p, "rb").read() == data for p, data in before.items())
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []  # scratch removed


def test_numba_kernels_match_numpy_bit_for_bit(big_suite, tmp_path, monkeypatch):
    pytest.importorskip("numba")
    import edgemerge.fast as fast

    base, tasks = big_suite
    for method in ("ties", "dare_ties", "consensus_ties", "breadcrumbs_ties"):
        monkeypatch.setattr(fast, "_JIT", None)  # numba path
        assert fast.kernel("tall_update") is not None
        merge(MergeConfig(base, tasks, method, chunk_elems=2048), tmp_path / "fast.safetensors")
        monkeypatch.setattr(fast, "_JIT", False)  # numpy path
        assert fast.kernel("tall_update") is None
        merge(MergeConfig(base, tasks, method, chunk_elems=2048), tmp_path / "numpy.safetensors")
        a, b = open_bundle(tmp_path / "fast.safetensors"), open_bundle(tmp_path / "numpy.safetensors")
        assert a.checksums == b.checksums, method
        for x, y in zip(a.manifest["tasks"], b.manifest["tasks"]):
            assert x.pop("recon_error") == pytest.approx(y.pop("recon_error"), rel=1e-9) and x == y
