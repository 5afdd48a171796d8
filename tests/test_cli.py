"""The CLI end to end, through real subprocesses, on tiny real torch models."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edgemerge.runtime import open_bundle


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "edgemerge.cli", *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def tiny_model(n_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, n_classes))


@pytest.fixture(scope="module")
def torch_suite(tmp_path_factory):
    """θ0 = a random init; each task fine-tunes it a few SGD steps on its own labelling rule."""
    d = tmp_path_factory.mktemp("suite")
    torch.manual_seed(0)
    base = tiny_model(2)
    torch.save({k: v for k, v in base.state_dict().items() if not k.startswith("4.")}, d / "base.pt")
    tasks = {}
    for t, n_cls in enumerate((2, 3)):
        model = tiny_model(n_cls)
        model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("4.")}, strict=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(256, 8)
        y = (x[:, t] > 0).long() + (n_cls == 3) * (x[:, t + 1] > 1).long()
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.save(model.state_dict(), d / f"task{t}.pt")
        tasks[f"task{t}"] = d / f"task{t}.pt"
    return d, tasks


def test_merge_inspect_extract_verify(torch_suite, tmp_path):
    d, tasks = torch_suite
    out = tmp_path / "bundle.safetensors"
    args = ["merge", d / "base.pt", "--method", "ties", "--param", "density=0.5", "--private", "4.*", "-o", out, "--quiet"]
    for name, path in tasks.items():
        args += ["--task", f"{name}={path}"]
    p = cli(*args)
    assert "task0" in p.stdout and "bundle" in p.stdout

    info = json.loads(cli("inspect", out, "--json").stdout)
    assert [t["name"] for t in info["tasks"]] == ["task0", "task1"]
    assert info["method"]["params"]["density"] == 0.5
    assert info["sections"]["mask"] == 2 * sum((p["numel"] + 7) // 8 for p in [
        {"numel": 16 * 8}, {"numel": 16}, {"numel": 16 * 16}, {"numel": 16}])
    assert info["bundle_bytes"] == out.stat().st_size
    assert info["separate_bytes_fp32"] == 2 * 4 * (16 * 8 + 16 + 16 * 16 + 16) + 4 * (2 * 16 + 2 + 3 * 16 + 3)

    assert "checksums match" in cli("verify", out).stdout

    # extract θ_t, load it into the torch model: same outputs as the bundle's own rebuild
    for t, n_cls in (("task0", 2), ("task1", 3)):
        cli("extract", out, "--task", t, "-o", tmp_path / f"{t}.safetensors")
        sd = load_file(str(tmp_path / f"{t}.safetensors"))
        model = tiny_model(n_cls)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
        ref = open_bundle(out).task_weights(t)
        assert all(np.array_equal(sd[k], ref[k]) for k in ref)
        x = torch.randn(4, 8)
        assert model(x).shape == (4, n_cls)


def test_user_errors_are_one_line_and_exit_2(torch_suite, tmp_path):
    d, tasks = torch_suite
    cases = [
        (["merge", d / "base.pt", "--task", f"a={tasks['task0']}", "--method", "nope", "-o", tmp_path / "x.safetensors"],
         "unknown merge method 'nope'; valid: breadcrumbs"),
        (["merge", d / "base.pt", "--task", f"a={tasks['task0']}", "-o", tmp_path / "x.safetensors", "--quiet"],
         "which the base lacks (mark task-private tensors with --private PATTERN)"),
        (["merge", d / "base.pt", "--task", "broken", "-o", tmp_path / "x.safetensors"], "must look like NAME=PATH"),
        (["inspect", tmp_path / "missing.safetensors"], "cannot read"),
    ]
    for args, needle in cases:
        p = cli(*args, check=False)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr.replace("\n", " ") or needle in p.stderr
        assert "Traceback" not in p.stderr


def test_extract_unknown_task_lists_valid_ones(torch_suite, tmp_path):
    d, tasks = torch_suite
    out = tmp_path / "b.safetensors"
    cli("merge", d / "base.pt", "--task", f"task0={tasks['task0']}", "--private", "4.*", "-o", out, "--quiet")
    p = cli("extract", out, "--task", "sst2", "-o", tmp_path / "x.safetensors", check=False)
    assert p.returncode == 2 and "unknown task 'sst2'; valid: task0" in p.stderr


def test_verify_detects_one_flipped_bit(torch_suite, tmp_path):
    d, tasks = torch_suite
    out = tmp_path / "b.safetensors"
    cli("merge", d / "base.pt", "--task", f"task0={tasks['task0']}", "--private", "4.*", "-o", out, "--quiet")
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x01
    out.write_bytes(bytes(data))
    p = cli("verify", out, check=False)
    assert p.returncode == 2 and "checksum mismatch" in p.stderr


def test_cli_ties_statistics_and_inspect(tmp_path):
    """--tie stores two names of one tensor once and inspect says so; merged statistics whose
    variance would go negative exit 2 with one message naming the tensor and the fix."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((9, 4)).astype(np.float32)
    base = {"emb.weight": emb, "head.weight": emb.copy(), "bn.running_var": np.ones(4, np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    args = []
    for t in range(3):
        e = emb + 0.1 * rng.standard_normal(emb.shape).astype(np.float32)
        save_file({"emb.weight": e, "head.weight": e.copy(), "bn.running_var": np.full(4, 0.6, np.float32)},
                  str(tmp_path / f"t{t}.safetensors"))
        args += ["--task", f"t{t}={tmp_path / f't{t}.safetensors'}"]
    out = tmp_path / "b.safetensors"
    cli("merge", tmp_path / "base.safetensors", *args, "--method", "task_arithmetic", "--tie", "head.weight=emb.weight",
        "-o", out, "--quiet")
    b = open_bundle(out)
    assert b.aliases == {"head.weight": "emb.weight"} and "bn.running_var" in b.private_keys["t0"]
    shown = cli("inspect", out).stdout
    assert "tied: head.weight is stored as emb.weight" in shown and "running statistics kept per task: 1" in shown
    p = cli("merge", tmp_path / "base.safetensors", *args, "--method", "task_arithmetic", "--statistics", "merge",
            "--masks", "none", "-o", tmp_path / "bad.safetensors", "--quiet", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'bn.running_var'" in p.stderr + p.stdout and "--statistics per-task" in p.stderr + p.stdout
    assert not (tmp_path / "bad.safetensors").exists()
    from edgemerge.cli import bundle_kernels
    from edgemerge.runtime.kernel import kernel_name

    assert bundle_kernels(b, kernel_name) == f"{kernel_name()} (F32)"
    save_file({"w": np.ones(64, np.float16)}, str(tmp_path / "h0.safetensors"))
    save_file({"w": np.full(64, 2, np.float16)}, str(tmp_path / "h1.safetensors"))
    cli("merge", tmp_path / "h0.safetensors", "--task", f"a={tmp_path / 'h1.safetensors'}", "-o", tmp_path / "h.safetensors",
        "--quiet", "--method", "task_arithmetic")
    # an fp16 bundle (τ in F16 too) names the kernel its switches run, not the float32 one
    assert bundle_kernels(open_bundle(tmp_path / "h.safetensors"), kernel_name) == f"{kernel_name(np.float16)} (F16)"
    p = cli("merge", tmp_path / "base.safetensors", *args, "--tie", "head.weight", "-o", tmp_path / "x.safetensors",
            check=False)
    assert p.returncode != 0 and "must be ALIAS=KEPT" in p.stderr + p.stdout


def test_error_messages_keep_their_brackets(tmp_path):
    """An install hint such as pip install 'edgemerge[onnx]' reaches the user whole (rich would
    read [onnx] as markup and drop it)."""
    p = cli("inspect", tmp_path / "missing[onnx].safetensors", check=False)
    assert p.returncode == 2 and "missing[onnx].safetensors" in p.stderr, p.stderr


def test_progress_reaches_a_log_as_lines(tmp_path):
    """Progress is not lost when the output is not a terminal (a log): one line per 10% and the end,
    each stage with its own total."""
    from conftest import make_suite

    base, tasks = make_suite(tmp_path)
    args = [a for t, path in tasks.items() for a in ("--task", f"{t}={path}")]
    p = cli("merge", base, *args, "--private", "head.*", "-o", tmp_path / "b.safetensors")
    lines = p.stderr.splitlines()
    n = len(open_bundle(tmp_path / "b.safetensors").header.tensors)
    assert f"write bundle: {n}/{n}" in lines and "write bundle: 1/" + str(n) in lines
    assert any(line.startswith("merge: ") for line in lines) and len(lines) < 60
