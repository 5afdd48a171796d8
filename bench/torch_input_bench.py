"""Peak RSS of a merge from torch files (.bin / .pt) against the same merge from safetensors.

The same BERT-base-like θ0 and task checkpoints are written both as safetensors and with
``torch.save`` (zip format, as ``pytorch_model.bin``), then merged in fresh subprocesses, one after
the other: from safetensors, from the torch files (positional reads, the default), and from the
torch files with every tensor kept mapped as loaded (what edgemerge did before: each page the merge
touches stays in its RSS). Goal (issue 12): torch files ≤ 1.5× the safetensors peak.

    python bench/torch_input_bench.py [--params-m 110] [--tasks 4] [--method ties] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402
from merge_bench import MERGE_CHILD, bert_like_shapes  # noqa: E402

KEPT_MAPPED = "import edgemerge.checkpoints as c; c.file_offsets = lambda path, state: {}\n"


def generate(directory: str, shapes, n_tasks: int) -> dict[str, dict[str, str]]:
    rng = np.random.default_rng(0)
    paths: dict[str, dict[str, str]] = {"safetensors": {}, "torch": {}}
    base = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.05) for k, s in shapes.items()}
    for name in ["base", *(f"task{t}" for t in range(n_tasks))]:
        sd = base if name == "base" else {k: v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3)
                                          for k, v in base.items()}
        paths["safetensors"][name] = os.path.join(directory, f"{name}.safetensors")
        save_file(sd, paths["safetensors"][name])
        paths["torch"][name] = os.path.join(directory, f"{name}.bin")
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, paths["torch"][name])
        del sd
    return paths


def run(paths: dict[str, str], method: str, out: str, prelude: str = "") -> dict:
    cfg = {"base": paths["base"], "tasks": {k: v for k, v in paths.items() if k != "base"}, "method": method}
    child = subprocess.run([sys.executable, "-c", prelude + MERGE_CHILD, json.dumps(cfg), out],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def import_torch_rss() -> int:
    code = ("h = lambda: next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "import edgemerge.pipeline\na = h()\nimport torch\nprint(h() - a)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=110.0)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="edgemerge-torch-bench-")
    try:
        paths = generate(directory, bert_like_shapes(args.params_m), args.tasks)
        input_bytes = sum(os.path.getsize(p) for p in paths["torch"].values())
        st = run(paths["safetensors"], args.method, os.path.join(directory, "a.safetensors"))
        pt = run(paths["torch"], args.method, os.path.join(directory, "b.safetensors"))
        mapped = run(paths["torch"], args.method, os.path.join(directory, "c.safetensors"), KEPT_MAPPED)
        from edgemerge.runtime import open_bundle

        sums = [open_bundle(os.path.join(directory, f"{x}.safetensors")).checksums for x in "abc"]
        same = sums[0] == sums[1] == sums[2]
        rows = [[label, f"{r['rss'] / 2**20:,.0f} MiB", f"{r['rss'] / st['rss']:.2f}×", f"{r['seconds']:.1f} s"]
                for label, r in (("safetensors inputs", st), ("torch .bin inputs (positional reads)", pt),
                                 ("torch .bin inputs, kept mapped (before)", mapped))]
        text = table(["merge from", "peak RSS", "vs safetensors", "merge time"], rows)
        torch_import = import_torch_rss()
        note = (f"{pt['n_params'] / 1e6:.0f} M parameters, θ0 + {args.tasks} tasks, {input_bytes / 2**20:,.0f} MiB of "
                f"torch files; method {args.method}; the three bundles have identical tensor checksums: {same}. "
                f"`import torch` alone raises a process's peak RSS by {torch_import / 2**20:,.0f} MiB here; "
                "reading torch files needs it, safetensors inputs do not.")
        print(text)
        print(note)
        print(f"machine: {machine()}")
        if not args.no_write:
            write_section("Merge from torch files (issue 12)", f"`python bench/torch_input_bench.py` — {note} "
                          f"Commit {git_rev()}.\n\nMachine: {machine()}.\n\n{text}\n\nGoal: torch files ≤ 1.5× the "
                          "safetensors peak.")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
