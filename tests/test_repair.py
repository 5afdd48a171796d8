"""repair=norm: the norm layers' affine params re-fit on calibration inputs (edgemerge/repair.py),
stored by the task's codec as every runtime rebuilds it (a delta in its codes; tall, tswitch and
emr as correction entries)."""

import os

import numpy as np
import pytest
import torch

from edgemerge.checkpoints import open_checkpoint
from edgemerge.codecs import encode_bundle, parse_codec, quantize_rows, select_codecs
from edgemerge.errors import ConfigError
from edgemerge.io import write_safetensors
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.repair import norm_repair
from edgemerge.runtime import open_bundle
from edgemerge.runtime.dtypes import DTYPES


class ConvNet(torch.nn.Module):
    """BatchNorm after each conv, a LayerNorm before the head, a transposed (Conv1D-style) weight
    [in, out] used as ``x @ W``, and a head whose size comes from the weights."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16)
        self.conv2, self.bn2 = torch.nn.Conv2d(16, 24, 3, padding=1, bias=False), torch.nn.BatchNorm2d(24)
        self.proj = torch.nn.Parameter(torch.randn(24, 32) / 5)  # [in, out]
        self.ln = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, n_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.head(self.ln(x @ self.proj))


NORMS = ("bn1", "bn2", "ln")


def build(task, weights):
    m = ConvNet(weights["head.weight"].shape[0])
    m.load_state_dict({k: torch.from_numpy(np.asarray(v).astype(np.float32) if np.asarray(v).dtype.kind == "V"
                                           or str(np.asarray(v).dtype) == "bfloat16" else np.array(v))
                       for k, v in weights.items()})
    return m.eval()


def calib(n=64, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return [(x[:n // 2],), (x[n // 2:],)]


@pytest.fixture(params=["F32", "BF16"])
def convnet(tmp_path, request):
    """θ0 (BatchNorm running statistics that are not 0 / 1) and 3 tasks moved in every learned
    param; the heads private. BF16: every float tensor stored in bfloat16."""
    torch.manual_seed(0)
    base = ConvNet(2)
    with torch.no_grad():
        for bn in (base.bn1, base.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    dt = DTYPES[request.param]
    cast = lambda v: v.numpy().astype(dt) if v.dtype.is_floating_point else v.numpy()  # noqa: E731
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    write_safetensors(tmp_path / "base.safetensors", {k: cast(v) for k, v in sd.items()}, checksums=False)
    tasks = {}
    for t in range(3):
        m = ConvNet(t + 2)
        m.load_state_dict(sd, strict=False)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.startswith("head."):
                    p.add_(0.3 * max(p.std().item(), 0.3) * torch.randn_like(p))  # the norms: ones and zeros in θ0
        path = tmp_path / f"t{t}.safetensors"
        write_safetensors(path, {k: cast(v) for k, v in m.state_dict().items()}, checksums=False)
        tasks[f"t{t}"] = str(path)
    out = str(tmp_path / "bundle.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "task_arithmetic", private=("head.*",)), out)
    return out, tasks, tmp_path


def theta(bundle, checkpoint, task):
    """θ_t as a full state dict: the checkpoint's merged params, the bundle's carried and private tensors."""
    w = dict(bundle.task_weights(task))
    ck = open_checkpoint(checkpoint)
    try:
        w.update({p.name: ck.read(p.name) for p in bundle.merged})
    finally:
        ck.close()
    return w


def stats(model, batches):
    """Per norm layer, the mean and variance of each channel of its output (float64)."""
    acc = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, a, o, n=n: acc.setdefault(n, []).append(o.detach().double().movedim(1, -1).reshape(-1, o.shape[1])
                                                         if o.dim() == 4 else o.detach().double())) for n in NORMS]
    with torch.no_grad():
        for (x,) in batches:
            model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return {n: (torch.cat(v).mean(0).numpy(), torch.cat(v).var(0, unbiased=False).numpy()) for n, v in acc.items()}


SPEC = "delta:dtype=I8,codes=lowrank,bits=1.5,step=2"


def encode_pair(path, tasks, d, spec, repair=None):
    """The same codec without and with repair=norm: (plain file, repaired file, repaired manifest)."""
    plain, fixed = str(d / "plain.safetensors"), str(d / "fixed.safetensors")
    encode_bundle(path, tasks, {t: parse_codec(spec) for t in tasks}, plain)
    m = encode_bundle(path, tasks, {t: parse_codec(spec + ",repair=norm") for t in tasks}, fixed,
                      repair=repair or norm_repair(build, lambda task: calib()))
    return plain, fixed, m


@pytest.mark.parametrize("spec", ["delta:dtype=I8,codes=lowrank,bits=1.5,step=0.05", "tswitch:density=0.3"])
def test_repair_matches_each_norm_layer_to_theta_t(convnet, spec):
    """Through the file, with the norm params stored finely (a delta at step 0.05; tswitch: F16
    correction entries): every norm layer's output statistics on the calibration inputs are θ_t's
    to within that rounding, a twentieth of the plain codec's drift over all of them; only the norm
    layers' params move."""
    path, tasks, d = convnet
    plain, fixed, m = encode_pair(path, tasks, d, spec)
    with open_bundle(plain) as a, open_bundle(fixed) as b:
        for e in m["tasks"]:
            t = e["name"]
            assert e["codec"]["repaired"] == 6  # γ and β of bn1, bn2, ln
            want = stats(build(t, theta(b, tasks[t], t)), calib())
            before, after = stats(build(t, a.task_weights(t)), calib()), stats(build(t, b.task_weights(t)), calib())
            drift = np.array([[np.abs(x[n][k] - want[n][k]).mean() for x in (before, after)] for n in NORMS for k in (0, 1)])
            # each layer's mean and variance: a tenth of the plain drift, or within the step-0.05 rounding where that was small
            assert (drift[:, 1] < np.maximum(0.1 * drift[:, 0], 0.01)).all() and drift[:, 1].sum() < 0.05 * drift[:, 0].sum(), (t, drift)
            for name in ("conv1.weight", "conv2.weight", "proj"):
                assert a.task_weights(t)[name].tobytes() == b.task_weights(t)[name].tobytes()


def test_repair_stores_the_formula_rounded_by_the_codec(convnet):
    """The first norm layer's stored γ and β are the REPAIR formula over the plain file's θ̂_t
    (γ·r, (β − μ̂)·r + μ with r = σ/σ̂ of its output against θ_t's), rounded by the codec's rule
    at step 0.5 × the RMS of τ where the codec's own small-param step is 2."""
    path, tasks, d = convnet
    plain, fixed, m = encode_pair(path, tasks, d, SPEC)
    with open_bundle(plain) as a, open_bundle(fixed) as b, open_bundle(path) as v1:
        for t in tasks:
            s_mean, s_var = stats(build(t, a.task_weights(t)), calib())["bn1"]
            t_mean, t_var = stats(build(t, theta(b, tasks[t], t)), calib())["bn1"]
            r = np.sqrt(t_var / s_var)
            w0 = a.task_weights(t)
            for key, value in (("weight", w0["bn1.weight"].astype(np.float64) * r),
                               ("bias", (w0["bn1.bias"].astype(np.float64) - s_mean) * r + t_mean)):
                base = v1.base(f"bn1.{key}")
                tau = value.astype(np.float32) - base.astype(np.float32)
                q, scale = quantize_rows(tau, base.shape, 127, "step", 0.5)
                expect = (base.astype(np.float32) + q.astype(np.float32) * scale[0]).astype(base.dtype).astype(np.float32)
                got = b.task_weights(t)[f"bn1.{key}"].astype(np.float32)
                # the statistics were summed in another order there: equal up to that, one code off at most at a tie
                tol = 1e-5 if base.dtype == np.float32 else 1e-2
                off = ~np.isclose(got, expect, rtol=tol, atol=1e-6)
                assert off.sum() <= 1 and np.abs(got - expect).max() <= 1.01 * scale[0] + tol, (t, key, got, expect)
                assert not np.array_equal(got, w0[f"bn1.{key}"].astype(np.float32))


@pytest.mark.parametrize("spec", [SPEC, "tswitch:density=0.3"])
def test_repair_improves_the_rebuilt_model_on_other_inputs(convnet, spec):
    """What the repair is for: on inputs it was not fit on, the repaired θ̂_t's logits are closer
    to θ_t's than the plain codec's, for every task."""
    path, tasks, d = convnet
    plain, fixed, _ = encode_pair(path, tasks, d, spec)
    x = torch.from_numpy(calib(200, seed=7)[0][0])
    with open_bundle(plain) as a, open_bundle(fixed) as b:
        for t, p in tasks.items():
            with torch.no_grad():
                ref = build(t, theta(a, p, t))(x)
                err_a = (build(t, a.task_weights(t))(x) - ref).pow(2).mean().item()
                err_b = (build(t, b.task_weights(t))(x) - ref).pow(2).mean().item()
            assert err_b < 0.5 * err_a, (t, err_a, err_b)


@pytest.mark.parametrize("spec", [SPEC, "delta:dtype=I8", "delta:dtype=I8,fit=step,step=2,codes=xz", "delta:dtype=I4,qmax=2",
                                  "delta:dtype=F16", "delta:dtype=BF16", "tswitch:density=0.3", "tall:planes=raw",
                                  "tall:planes=xz,scale=ls", "emr:planes=xz"])
def test_what_the_repair_measured_is_what_every_reader_rebuilds(convnet, spec):
    """Each codec: the values refit returned to the repair (what its later layers were fit on)
    are the file's values bit for bit, through the Bundle reader and the numpy reference rule; the
    params it did not re-fit are the plain codec's (tall / tswitch / emr: correction entries at the
    re-fit params only, as many as the codec declares)."""
    from edgemerge.runtime.codecs import rebuild_reference

    path, tasks, d = convnet
    seen = {}
    inner = norm_repair(build, lambda t: calib())

    def spy(task, teacher, student, refit):
        seen[task] = {k: np.array(v) for k, v in inner(task, teacher, student, refit).items()}
        return seen[task]

    plain, fixed, m = encode_pair(path, tasks, d, spec, repair=spy)
    with open_bundle(plain) as a, open_bundle(fixed, verify=True) as b:
        for t in tasks:
            assert sorted(seen[t]) == sorted(f"{n}.{k}" for n in NORMS for k in ("weight", "bias"))
            w, w0 = b.task_weights(t), a.task_weights(t)
            c = b.codecs[t]
            if c.name != "delta":
                fixes = {p.name: b.recipe(t, p.name).fix_index.size for p in b.merged}
                assert c.correction == sum(fixes.values()) > 0 and {k for k, n in fixes.items() if n} <= set(seen[t]), (t, fixes)
            for p in b.merged:
                vector = b.vector(p.name) if c.shared else b.elected_vector(p.name) if c.name == "emr" else None
                ref = rebuild_reference(b.base(p.name), vector, b.recipe(t, p.name)).reshape(p.shape)
                assert w[p.name].tobytes() == ref.tobytes(), (t, p.name)
                if p.name in seen[t]:
                    assert w[p.name].tobytes() == seen[t][p.name].tobytes(), (t, p.name)
                else:
                    assert w[p.name].tobytes() == w0[p.name].tobytes(), (t, p.name)


def test_repair_bad_input_is_refused_before_any_file(convnet):
    path, tasks, d = convnet
    out = str(d / "out.safetensors")
    lowrank = {t: parse_codec(SPEC + ",repair=norm") for t in tasks}
    with pytest.raises(ConfigError, match="pass repair="):
        encode_bundle(path, tasks, lowrank, out)
    with pytest.raises(ConfigError, match="repair and correction do not combine"):
        parse_codec("tswitch:density=0.1,repair=norm,correction=0.01")
    with pytest.raises(ConfigError, match="repair and correction do not combine"):
        parse_codec("delta:dtype=I8,repair=norm,correction=0.01")
    with pytest.raises(ConfigError, match="repair must be one of none, norm"):
        parse_codec("delta:dtype=I8,repair=bn")
    with pytest.raises(ConfigError, match="no calibration inputs"):
        encode_bundle(path, tasks, lowrank, out, repair=norm_repair(build, lambda t: []))

    def factored(task, teacher, student, refit):  # a lowrank-factored matrix is not the repair's to change
        return {"conv2.weight": refit("conv2.weight", np.asarray(student["conv2.weight"]))}

    with pytest.raises(ConfigError, match="'conv2.weight', a lowrank-factored matrix"):
        encode_bundle(path, tasks, lowrank, out, repair=factored)
    with pytest.raises(ConfigError, match="'nope.weight', not a merged param"):
        encode_bundle(path, tasks, lowrank, out, repair=lambda t, a, b, refit: {"nope.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="shape \\[3\\], the param is \\[16\\]"):
        encode_bundle(path, tasks, lowrank, out, repair=lambda t, a, b, refit: {"bn1.bias": np.zeros(3, np.float32)})

    class NoNorm(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def build_plain(task, weights):  # the same weights, the norm layers' names not the params'
        m = NoNorm(build(task, weights))
        for n in NORMS:
            setattr(m.inner, n, torch.nn.Identity())
        return m

    with pytest.raises(ConfigError, match="repair=norm has nothing to re-fit"):
        encode_bundle(path, tasks, lowrank, out, repair=norm_repair(build_plain, lambda t: calib()))
    with pytest.raises(ConfigError, match="pass repair="):  # the selector refuses before encoding anything
        select_codecs(path, tasks, None, 99, str(d / "scratch.safetensors"), candidates=(SPEC + ",repair=norm",))
    with pytest.raises(ConfigError, match="needs a validation score"):
        select_codecs(path, tasks, None, 99, str(d / "scratch.safetensors"), candidates=(SPEC + ",repair=norm",),
                      repair=norm_repair(build, lambda t: calib()))
    assert not os.path.exists(out) and not os.path.exists(d / "scratch.safetensors")


def test_selector_tries_repaired_candidates(convnet):
    """select_codecs with a repair: a repaired candidate is encoded with it and scored like any
    other; its label names the repair, and the manifest counts the re-fit params."""
    path, tasks, d = convnet
    from edgemerge.codecs import choice_notes

    cands = (SPEC, SPEC + ",repair=norm")
    fixed = norm_repair(build, lambda t: calib())
    x = torch.from_numpy(calib(200, seed=7)[0][0])
    with open_bundle(path) as v1:
        refs = {t: build(t, theta(v1, p, t))(x).detach() for t, p in tasks.items()}

    def score(task, weights):  # higher is better: closeness of the logits to θ_t's
        with torch.no_grad():
            return 1.0 / (1e-9 + (build(task, weights)(x) - refs[task]).pow(2).mean().item())

    choices = select_codecs(path, tasks, score, 1.0, str(d / "scratch.safetensors"), candidates=cands, repair=fixed)
    for t, c in choices.items():
        by = {label: norm for label, _, norm in c.tried}
        assert by[SPEC + ",repair=norm"] > by[SPEC], (t, by)
    out = str(d / "chosen.safetensors")
    m = encode_bundle(path, tasks, {t: c.spec for t, c in choices.items()}, out, notes=choice_notes(choices, 1.0), repair=fixed)
    for e in m["tasks"]:
        assert (e["codec"].get("repaired", 0) == 6) == (choices[e["name"]].spec.repair == "norm")


def test_cli_refuses_repair_naming_the_python_api(convnet):
    """The CLI has no model to run: `encode --codec ...,repair=norm` exits 2 before writing, naming the API."""
    import subprocess
    import sys

    path, tasks, d = convnet
    out = str(d / "cli.safetensors")
    p = subprocess.run([sys.executable, "-m", "edgemerge", "encode", path, *(f"--task={t}={c}" for t, c in tasks.items()),
                        "--codec", SPEC + ",repair=norm", "-o", out, "--quiet"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "edgemerge.repair.norm_repair" in p.stderr and "the CLI has no model to run" in p.stderr, p.stderr
    assert not os.path.exists(out)


def test_a_norm_layer_run_twice_a_pass_keeps_its_values(convnet):
    """A LayerNorm shared by two places in the forward pass is not re-fit (one γ, β for two sets of
    statistics, and the fitting pass would see its first call only); the others still are."""
    path, tasks, d = convnet

    class Shared(ConvNet):
        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.bn2(self.conv2(x))).mean((2, 3))
            return self.head(self.ln(self.ln(x @ self.proj) * 2))

    def build_shared(task, weights):
        m = Shared(weights["head.weight"].shape[0])
        m.load_state_dict(build(task, weights).state_dict())
        return m.eval()

    plain, fixed, m = encode_pair(path, tasks, d, SPEC, repair=norm_repair(build_shared, lambda t: calib()))
    with open_bundle(plain) as a, open_bundle(fixed) as b:
        for e in m["tasks"]:
            t = e["name"]
            assert e["codec"]["repaired"] == 4  # bn1 and bn2
            for k in ("ln.weight", "ln.bias"):
                assert b.task_weights(t)[k].tobytes() == a.task_weights(t)[k].tobytes()
            assert b.task_weights(t)["bn2.bias"].tobytes() != a.task_weights(t)["bn2.bias"].tobytes()


class TokNet(torch.nn.Module):
    """A text model in miniature: token embeddings, two Linear + LayerNorm layers over every token,
    the head on the mean over the tokens the attention mask keeps (pads are computed, never read)."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.lin1, self.ln1 = torch.nn.Linear(16, 16, bias=False), torch.nn.LayerNorm(16)
        self.lin2, self.ln2 = torch.nn.Linear(16, 16, bias=False), torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, n_classes)

    def forward(self, ids, mask):
        h = self.ln2(self.lin2(torch.relu(self.ln1(self.lin1(self.emb(ids))))))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def build_tok(task, weights):
    m = TokNet(weights["head.weight"].shape[0])
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return m.eval()


def padded(n=48, seed=3):
    """Batches of (ids, mask): lengths 2-12 padded to 12 with id 0 (about half the positions pads)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        lengths = rng.integers(2, 13, n // 2)
        mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
        out.append((np.where(mask == 1, rng.integers(1, 20, (n // 2, 12)), 0), mask))
    return out


@pytest.fixture
def toknet(tmp_path):
    """θ0 whose pad embedding (id 0) sits far from the others, and 3 tasks moved in every learned param."""
    torch.manual_seed(0)
    base = TokNet(2)
    with torch.no_grad():
        base.emb.weight[0].mul_(8.0).add_(3.0)
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    write_safetensors(tmp_path / "base.safetensors", {k: v.numpy() for k, v in sd.items()}, checksums=False)
    tasks = {}
    for t in range(3):
        m = TokNet(t + 2)
        m.load_state_dict(sd, strict=False)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.startswith("head."):
                    p.add_(0.3 * max(p.std().item(), 0.3) * torch.randn_like(p))
        write_safetensors(tmp_path / f"t{t}.safetensors", {k: v.numpy() for k, v in m.state_dict().items()}, checksums=False)
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    out = str(tmp_path / "bundle.safetensors")
    merge(MergeConfig(str(tmp_path / "base.safetensors"), tasks, "task_arithmetic", private=("head.*",)), out)
    return out, tasks, tmp_path


def token_stats(model, batches):
    """Per LayerNorm, the mean and variance of each channel over the tokens the mask keeps."""
    acc = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: acc.setdefault(n, []).append(o.detach().double()))
             for n in ("ln1", "ln2")]
    keep = []
    with torch.no_grad():
        for ids, mask in batches:
            model(torch.from_numpy(ids), torch.from_numpy(mask))
            keep.append(torch.from_numpy(mask.reshape(-1) == 1))
    for h in hooks:
        h.remove()
    out = {}
    for n, v in acc.items():
        x = torch.cat([o.reshape(-1, 16)[k] for o, k in zip(v, keep)])
        out[n] = (x.mean(0).numpy(), x.var(0, unbiased=False).numpy())
    return out


def test_padded_batches_fit_the_tokens_the_mask_keeps(toknet):
    """positions= (the attention mask): each LayerNorm's statistics over the real tokens are θ_t's
    to within the fine rounding (a twentieth of the plain codec's drift), where a repair that counts
    the pads too leaves over ten times as much; the pooled logits of other batches are closer to
    θ_t's than either's."""
    path, tasks, d = toknet
    spec = "delta:dtype=I8,codes=lowrank,bits=1.5,step=0.05"
    plain, masked, _ = encode_pair(path, tasks, d, spec, repair=norm_repair(build_tok, lambda t: padded(),
                                                                          positions=lambda batch: batch[1]))
    every = str(d / "every.safetensors")
    encode_bundle(path, tasks, {t: parse_codec(spec + ",repair=norm") for t in tasks}, every,
                  repair=norm_repair(build_tok, lambda t: padded()))
    other = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in padded(200, seed=9)]
    with open_bundle(plain) as a, open_bundle(masked) as b, open_bundle(every) as c:
        for t in tasks:
            want = token_stats(build_tok(t, theta(b, tasks[t], t)), padded())
            drift = {}
            for key, f in (("plain", a), ("masked", b), ("every", c)):
                got = token_stats(build_tok(t, f.task_weights(t)), padded())
                drift[key] = sum(np.abs(got[n][k] - want[n][k]).mean() for n in got for k in (0, 1))
            assert drift["masked"] < 0.05 * drift["plain"] and drift["masked"] < 0.1 * drift["every"], (t, drift)
            with torch.no_grad():
                ref = torch.cat([build_tok(t, theta(b, tasks[t], t))(*x) for x in other])
                err = {k: (torch.cat([build_tok(t, f.task_weights(t))(*x) for x in other]) - ref).pow(2).mean().item()
                       for k, f in (("plain", a), ("masked", b), ("every", c))}
            assert err["masked"] < min(err["every"], err["plain"]), (t, err)


def test_positions_that_do_not_fit_a_layer_are_refused(toknet):
    path, tasks, d = toknet
    codecs = {t: parse_codec("delta:dtype=I8,codes=lowrank,bits=1.5,repair=norm") for t in tasks}
    out = str(d / "out.safetensors")
    with pytest.raises(ConfigError, match=r"layer 'ln1' outputs \(24, 12, 16\), whose positions are \[24, 12\], "
                                          r"but positions\(batch\) marked \[24, 11\]"):
        encode_bundle(path, tasks, codecs, out, repair=norm_repair(build_tok, lambda t: padded(), positions=lambda b: b[1][:, 1:]))
    with pytest.raises(ConfigError, match="marked no position of layer 'ln1'"):
        encode_bundle(path, tasks, codecs, out, repair=norm_repair(build_tok, lambda t: padded(), positions=lambda b: 0 * b[1]))
    assert not os.path.exists(out)
