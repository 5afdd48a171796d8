"""Merge benchmark: 8 task checkpoints of a ≥100 M-parameter model -> one TIES + TALL bundle.

Measures, side by side in one run on this machine:
- the time to merely read every input tensor (page cache warm: read once, then timed),
- the wall time of the merge (a fresh subprocess, so its peak RSS is its own),
- the merge's peak RSS, and bundle bytes vs the 8 inputs.
Goals (issue #2): peak RSS < 25% of the input bytes; merge time ≤ 3× the read time.

    python bench/merge_bench.py [--params-m 108] [--tasks 8] [--method ties] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402


def bert_like_shapes(target_m: float) -> dict[str, tuple[int, ...]]:
    """A BERT-base-like layout (768 wide, 3072 MLP) with as many layers as reach target_m M params."""
    shapes = {"embeddings.word.weight": (30522, 768), "embeddings.position.weight": (512, 768)}
    layer = 0
    while sum(int(np.prod(s)) for s in shapes.values()) < target_m * 1e6:
        p = f"layer.{layer}."
        for name in ("q", "k", "v", "o"):
            shapes[p + f"attn.{name}.weight"] = (768, 768)
            shapes[p + f"attn.{name}.bias"] = (768,)
        shapes[p + "mlp.up.weight"], shapes[p + "mlp.up.bias"] = (3072, 768), (3072,)
        shapes[p + "mlp.down.weight"], shapes[p + "mlp.down.bias"] = (768, 3072), (768,)
        shapes[p + "norm.weight"], shapes[p + "norm.bias"] = (768,), (768,)
        layer += 1
    return shapes


def generate(directory: str, shapes, n_tasks: int) -> tuple[str, dict[str, str]]:
    rng = np.random.default_rng(0)
    base = {k: (rng.standard_normal(s, dtype=np.float32) * 0.05) for k, s in shapes.items()}
    save_file(base, os.path.join(directory, "base.safetensors"))
    tasks = {}
    for t in range(n_tasks):
        sd = {k: v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3) for k, v in base.items()}
        path = os.path.join(directory, f"task{t}.safetensors")
        save_file(sd, path)
        tasks[f"task{t}"] = path
        del sd
    return os.path.join(directory, "base.safetensors"), tasks


def read_all(paths: list[str]) -> float:
    from edgemerge.checkpoints import open_checkpoint

    t0 = time.perf_counter()
    for p in paths:
        c = open_checkpoint(p)
        for k in c.keys():
            c.read(k)
        c.close()
    return time.perf_counter() - t0


MERGE_CHILD = """
import json, sys, time
from edgemerge.pipeline import MergeConfig, merge
cfg = MergeConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
r = merge(cfg, sys.argv[2])
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # not inherited across exec
print(json.dumps({"seconds": time.perf_counter() - t0, "rss": hwm,
                  "bundle": r.bundle_bytes, "n_params": r.n_params,
                  "tasks": [[t.name, t.lam, t.density] for t in r.tasks]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=100.0, help="model size in millions of parameters (at least)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--keep", help="generate into / reuse this folder instead of a temp dir")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args()

    directory = args.keep or tempfile.mkdtemp(prefix="edgemerge-bench-")
    os.makedirs(directory, exist_ok=True)
    try:
        shapes = bert_like_shapes(args.params_m)
        t0 = time.perf_counter()
        if args.keep and os.path.exists(os.path.join(directory, f"task{args.tasks - 1}.safetensors")):
            base = os.path.join(directory, "base.safetensors")
            tasks = {f"task{t}": os.path.join(directory, f"task{t}.safetensors") for t in range(args.tasks)}
        else:
            base, tasks = generate(directory, shapes, args.tasks)
        gen = time.perf_counter() - t0
        inputs = [base, *tasks.values()]
        input_bytes = sum(os.path.getsize(p) for p in inputs)
        task_bytes = sum(os.path.getsize(p) for p in tasks.values())
        read_all(inputs)  # warm the page cache
        t_read = min(read_all(inputs) for _ in range(2))
        cfg = {"base": base, "tasks": tasks, "method": args.method}
        out = os.path.join(directory, "bundle.safetensors")
        child = subprocess.run([sys.executable, "-c", MERGE_CHILD, json.dumps(cfg), out], capture_output=True, text=True, check=True)
        res = json.loads(child.stdout.strip().splitlines()[-1])
        n = res["n_params"]
        rows = [
            ["parameters", f"{n / 1e6:.1f} M", ""],
            ["inputs (θ0 + tasks)", f"{input_bytes / 2**20:,.0f} MiB", f"{len(tasks)} tasks + base, fp32 safetensors"],
            ["read all inputs (warm)", f"{t_read:.2f} s", "positional reads, the merge's own reader"],
            [f"merge {args.method} + TALL", f"{res['seconds']:.2f} s", f"{res['seconds'] / t_read:.2f}× read (goal ≤ 3×)"],
            ["peak RSS of the merge", f"{res['rss'] / 2**20:,.0f} MiB", f"{res['rss'] / input_bytes:.1%} of inputs (goal < 25%)"],
            ["bundle", f"{res['bundle'] / 2**20:,.0f} MiB", f"{res['bundle'] / task_bytes:.1%} of the {len(tasks)} task checkpoints"],
        ]
        text = table(["what", "value", "note"], rows)
        print(text)
        print(f"(generated inputs in {gen:.0f} s; machine: {machine()})")
        if not args.no_write:
            write_section("Merge (issue 2)", f"`python bench/merge_bench.py` — {len(tasks)} tasks, method {args.method}, "
                          f"λ grid 0.2–0.6, commit {git_rev()}.\n\nMachine: {machine()}.\n\n{text}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
