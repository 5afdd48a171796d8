"""TorchTaskModel and the torch / Triton mask kernels vs the numpy reference, bit for bit."""

import threading

import numpy as np
import pytest
import torch

from edgemerge.errors import BackendError, ConfigError, FormatError, TaskError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle
from edgemerge.runtime.dtypes import DTYPES
from edgemerge.runtime.kernel import apply_mask_reference
from edgemerge.runtime.torch_backend import ALIGN, TorchTaskModel, apply_mask_torch, to_torch, triton_available

import models
from models import as_bytes, make_tiny_suite, torch_forward

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU (run bench/gpu_check.sh on one)")
DTYPE_PAIRS = [("F32", "F32"), ("F32", "F16"), ("BF16", "BF16"), ("F16", "F32")]


def random_case(n, dtypes, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    base[: min(n, 3)] = -0.0  # the select keeps -0.0 where the bit is off
    if n > 10:
        base[5] = np.float32(1e-40)  # a subnormal: no kernel may flush it
    base = base.astype(DTYPES[dtypes[0]])
    vec = rng.standard_normal(n).astype(np.float32).astype(DTYPES[dtypes[1]])
    packed = np.packbits(rng.random(n) < 0.4)
    return base, vec, packed


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_suite(tmp_path_factory.mktemp("torch"))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, 40_013])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS)
def test_torch_ops_kernel_matches_reference(n, dtypes):
    base, vec, packed = random_case(n, dtypes, seed=n)
    b, v, m = to_torch(base, dtypes[0], "cpu"), to_torch(vec, dtypes[1], "cpu"), to_torch(packed, "U8", "cpu")
    out = torch.empty_like(b)
    apply_mask_torch(b, v, m, out, block=1024)  # several blocks, a ragged last one
    ref = apply_mask_reference(base, vec, packed)
    assert as_bytes(out) == ref.tobytes()


@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_every_task_matches_the_reference_forward(bundle, kernel):
    tm = TorchTaskModel(bundle, models.Tiny(2), kernel=kernel)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    for task in bundle.tasks * 2:  # switching back and forth must not drift
        tm.switch(task)
        state = tm.model.state_dict()
        for name, want in bundle.task_weights(task).items():
            assert as_bytes(state[name]) == np.ascontiguousarray(want).tobytes(), (task, name)
        got = tm(torch.from_numpy(x)).numpy()
        assert np.array_equal(got, torch_forward(bundle, task, x)), task


def test_flat_layout_aligns_and_keeps_padding_zero(bundle):
    tm = TorchTaskModel(bundle, models.Tiny(2), kernel="torch")
    tm.switch(bundle.tasks[1])
    (group,) = tm._flat.groups.values()
    offsets = sorted(group["offsets"].items(), key=lambda kv: kv[1])
    assert all(o % ALIGN == 0 for _, o in offsets)
    out = group["out"]
    for (name, o), nxt in zip(offsets, [o for _, o in offsets[1:]] + [out.numel()]):
        n = bundle.param(name).numel
        assert out[o : o + n].data_ptr() == dict(tm.model.named_parameters())[name].data_ptr()
        assert torch.count_nonzero(out[o + n : nxt]) == 0
    assert tm.resident_bytes() == sum(t.numel() * t.element_size() for t in
                                      [group["base"], group["vector"], group["out"], *group["masks"].values()])


def test_bfloat16_bundle_runs_on_the_cpu_kernel(tmp_path):
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((6, 5)).astype(DTYPES["BF16"])}
    from edgemerge.io import write_safetensors

    write_safetensors(tmp_path / "b.safetensors", base, checksums=False)
    tasks = {}
    for t in range(2):
        write_safetensors(tmp_path / f"t{t}.safetensors",
                          {"w": (base["w"].astype(np.float32) + rng.standard_normal((6, 5))).astype(DTYPES["BF16"])},
                          checksums=False)
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    merge(MergeConfig(str(tmp_path / "b.safetensors"), tasks, "task_arithmetic"), tmp_path / "bundle.safetensors")
    b = open_bundle(tmp_path / "bundle.safetensors")
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.bfloat16))
    tm = TorchTaskModel(b, model)  # bfloat16 storage viewed as ml_dtypes: the C half kernel writes it
    assert tm.kernel == "numpy"
    tm.switch("t1")
    assert as_bytes(model.w) == b.task_weights("t1")["w"].tobytes()
    other = torch.nn.Module()
    other.w = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.bfloat16))
    TorchTaskModel(b, other, kernel="torch").switch("t1")
    assert as_bytes(other.w) == as_bytes(model.w)


def test_bad_input(bundle):
    with pytest.raises(ConfigError, match="unknown kernel 'cuda'"):
        TorchTaskModel(bundle, models.Tiny(2), kernel="cuda")
    if not CUDA:
        with pytest.raises(BackendError, match="kernel 'triton' needs a CUDA device"):
            TorchTaskModel(bundle, models.Tiny(2), kernel="triton")
    wrong = models.Tiny(2)
    wrong.enc[0] = torch.nn.Linear(8, 16, bias=False)
    wrong.extra = torch.nn.Linear(2, 2)
    with pytest.raises(FormatError) as e:
        TorchTaskModel(bundle, wrong)
    msg = str(e.value)
    assert "bundle parameter 'enc.0.bias' is not in the model" in msg
    assert "model tensor 'extra.weight' is not in the bundle" in msg and "strict=False" in msg
    TorchTaskModel(bundle, models.Tiny(2), strict=True)  # the matching model passes
    tm = TorchTaskModel(bundle, models.Tiny(2))
    with pytest.raises(ConfigError, match="no task selected"):
        tm(torch.zeros(1, 8))
    with pytest.raises(TaskError, match="valid: t0, t1, t2"):
        tm.switch("nope")


def test_run_as_task_under_concurrent_switching(bundle):
    tm = TorchTaskModel(bundle, models.Tiny(2), kernel="torch")
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    want = {t: torch_forward(bundle, t, x) for t in bundle.tasks}
    bad, stop = [], threading.Event()

    def runner(i):
        for k in range(60):
            task = bundle.tasks[(i + k) % len(bundle.tasks)]
            if not np.array_equal(tm(torch.from_numpy(x), task=task).numpy(), want[task]):
                bad.append(task)

    def switcher():
        k = 0
        while not stop.is_set():
            tm.switch(bundle.tasks[k % 3])
            k += 1

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(3)]
    sw = threading.Thread(target=switcher)
    sw.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sw.join()
    assert bad == []


@needs_cuda
@pytest.mark.parametrize("n", [1, 9, 1001, 3_000_017])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS)
@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_cuda_kernels_match_reference(n, dtypes, kernel):
    base, vec, packed = random_case(n, dtypes, seed=n)
    b, v, m = (to_torch(a, d, "cuda") for a, d in [(base, dtypes[0]), (vec, dtypes[1]), (packed, "U8")])
    out = torch.empty_like(b)
    if kernel == "triton":
        pytest.importorskip("triton")
        from edgemerge.runtime.triton_kernel import apply_mask_triton

        apply_mask_triton(b, v, m, out)
    else:
        apply_mask_torch(b, v, m, out)
    assert as_bytes(out) == apply_mask_reference(base, vec, packed).tobytes()


@needs_cuda
def test_cuda_model_switches_bit_exact(bundle):
    tm = TorchTaskModel(bundle, models.Tiny(2).cuda())
    assert tm.kernel == ("triton" if triton_available(torch.device("cuda")) else "torch")
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    for task in bundle.tasks * 2:
        tm.switch(task)
        state = tm.model.state_dict()
        for name, want in bundle.task_weights(task).items():
            assert as_bytes(state[name]) == np.ascontiguousarray(want).tobytes(), (task, name)
        got = tm(torch.from_numpy(x).cuda()).cpu().numpy()
        np.testing.assert_allclose(got, torch_forward(bundle, task, x), atol=1e-4, rtol=1e-4)
