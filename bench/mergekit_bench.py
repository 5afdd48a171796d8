"""TIES merge wall time and peak RSS, edgemerge against mergekit, side by side (issue 16's goal:
edgemerge's TIES merge ≤ 0.5× mergekit's time).

The inputs: a GPT-2 small (124 M) base θ0 with random weights and `--tasks` task checkpoints
θ0 + a dense random τ_t (as a few hundred Adam steps leave it), each a Hugging Face folder
(config.json + model.safetensors), which both tools read. Both merge with TIES at density 0.2 per
tensor, λ 1, disjoint mean (mergekit's normalize: true), float32, on the CPU: mergekit as
`mergekit-yaml` (on PATH; not a dependency of edgemerge: `pip install mergekit`, in its own
environment if its requirements clash), edgemerge as `edgemerge merge --masks none` (one merged
model, what mergekit writes) and with its default TALL masks (the bundle the product ships). Each
run is a fresh subprocess, so its peak RSS (``wait4``; mapped input pages it touched count) is its
own; the page cache is warm (every input read once first); rounds interleave the tools, and the
table shows the medians. Writes docs/BENCHMARKS.md.

    python bench/mergekit_bench.py [--tasks 8] [--rounds 2] [--keep DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

DENSITY = 0.2


def make_inputs(root: str, tasks: int, seed: int = 0) -> tuple[str, list[str]]:
    """θ0 and the task folders under root; returns their paths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    base = os.path.join(root, "base")
    model.save_pretrained(base, safe_serialization=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for t in range(tasks):
        g = torch.Generator().manual_seed(seed + 1 + t)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point() and v.dim() > 0:
                    v.copy_(state[k] + 0.01 * state[k].std() * torch.randn(v.shape, generator=g))
        p = os.path.join(root, f"task{t}")
        model.save_pretrained(p, safe_serialization=True)
        paths.append(p)
    return base, paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one subprocess; its output goes to a log it prints on failure."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"{cmd[0]} failed:\n{log.read()[-4000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", help="build the inputs here (or reuse them) instead of a temporary folder")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    mk = shutil.which("mergekit-yaml")
    if mk is None:
        sys.exit("mergekit-yaml is not on PATH: `pip install mergekit` (in its own environment if its requirements clash)")
    root = args.keep or tempfile.mkdtemp(prefix="mergekit-bench-")
    os.makedirs(root, exist_ok=True)
    try:
        if not os.path.exists(os.path.join(root, f"task{args.tasks - 1}", "model.safetensors")):
            base, tasks = make_inputs(root, args.tasks)
        else:
            base, tasks = os.path.join(root, "base"), [os.path.join(root, f"task{t}") for t in range(args.tasks)]
        files = [os.path.join(p, "model.safetensors") for p in [base, *tasks]]
        for f in files:  # warm the page cache: both tools read the same bytes
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        cfg = os.path.join(root, "ties.yml")
        with open(cfg, "w") as f:  # JSON is YAML
            json.dump({"merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"normalize": True},
                       "models": [{"model": p, "parameters": {"density": DENSITY, "weight": 1.0}} for p in tasks]}, f)
        out = os.path.join(root, "out")
        em = [sys.executable, "-m", "edgemerge.cli", "merge", files[0], "--method", "ties", "--quiet",
              "--param", f"density={DENSITY}", "--param", "topk_scope=tensor",
              *[a for i, f in enumerate(files[1:]) for a in ("--task", f"task{i}={f}")]]
        runs = {
            "mergekit-yaml (TIES, one merged model)": [mk, cfg, os.path.join(out, "mergekit"), "--no-copy-tokenizer"],
            "edgemerge merge --masks none (TIES, one merged model)": [*em, "--masks", "none", "-o", os.path.join(out, "merged.safetensors")],
            "edgemerge merge (TIES + TALL masks bundle)": [*em, "-o", os.path.join(out, "bundle.safetensors")],
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, cmd in runs.items():
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                times[name].append(timed(cmd))
                print(f"round {r + 1} {name}: {times[name][-1][0]:.1f} s, {times[name][-1][1]:.0f} MiB", flush=True)
        inputs = sum(os.path.getsize(f) for f in files) / 2**20
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    wall = {name: statistics.median(w for w, _ in ts) for name, ts in times.items()}
    rss = {name: statistics.median(m for _, m in ts) for name, ts in times.items()}
    mergekit, edgemerge = list(runs)[:2]  # the two one-merged-model runs the goal compares
    ref, ratio = wall[mergekit], wall[edgemerge] / wall[mergekit]
    text = table(["run", "wall (median)", "÷ mergekit", "peak RSS", "RSS ÷ inputs"],
                 [[n, f"{wall[n]:.1f} s", f"{wall[n] / ref:.2f}×", f"{rss[n]:,.0f} MiB", f"{100 * rss[n] / inputs:.1f}%"] for n in runs])
    goal = f"edgemerge TIES ÷ mergekit TIES, one merged model each: {ratio:.2f}× (goal ≤ 0.5 — {'met' if ratio <= 0.5 else 'MISSED'})"
    print(f"\n{text}\n{goal}\nmachine: {machine()}")
    if args.no_write:
        return
    write_section("Merge against mergekit (issue 16)",
                  f"`python bench/mergekit_bench.py --tasks {args.tasks} --rounds {args.rounds}` — commit {git_rev()}; GPT-2 small "
                  f"(124 M) θ0 with random weights + {args.tasks} dense task vectors, Hugging Face folders, {inputs:,.0f} MiB of "
                  f"inputs, page cache warm; TIES density {DENSITY} per tensor, λ 1, disjoint mean (mergekit normalize: true), float32, CPU; each run a fresh "
                  f"subprocess, rounds interleaved, medians.\n\nMachine: {machine()}.\n\n{text}\n\n- {goal}")


if __name__ == "__main__":
    main()
