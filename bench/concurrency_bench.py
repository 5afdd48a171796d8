"""Concurrency under load (issue 6): K threads run random tasks while one thread switches nonstop.

Every output is compared with the reference output of the task the run was made under (computed
beforehand, one task at a time). Figures: runs, switches, mismatches (goal 0), latency p50/p99.

    python bench/concurrency_bench.py [--threads 4] [--runs 300] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RELIABILITY, git_rev, machine, table, write_section  # noqa: E402

from edgemerge.export.onnx import export_onnx  # noqa: E402
from edgemerge.io import write_safetensors  # noqa: E402
from edgemerge.pipeline import MergeConfig, merge  # noqa: E402
from edgemerge.runtime import open_bundle  # noqa: E402
from edgemerge.runtime.session import TaskSession  # noqa: E402

WIDTH, DEPTH = 512, 6


def factory(task: str, shapes: dict):
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10)), (torch.zeros(8, WIDTH),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=300, help="runs per thread")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="edgemerge-conc-")
    torch.manual_seed(0)
    base = {k: v.numpy().copy() for k, v in factory("", {})[0].state_dict().items()}
    write_safetensors(f"{d}/base.safetensors", base, checksums=False)
    rng = np.random.default_rng(0)
    tasks = {}
    for t in range(args.tasks):
        sd = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in base.items()}
        write_safetensors(f"{d}/t{t}.safetensors", sd, checksums=False)
        tasks[f"t{t}"] = f"{d}/t{t}.safetensors"
    merge(MergeConfig(f"{d}/base.safetensors", tasks, "ties"), f"{d}/b.safetensors")
    bundle = open_bundle(f"{d}/b.safetensors")
    exp = export_onnx(bundle, factory, d, input_names=["x"])
    session = TaskSession(bundle, exp.switchable)
    x = rng.standard_normal((8, WIDTH)).astype(np.float32)
    refs = {t: session.run(x, task=t)[0] for t in bundle.tasks}
    mismatches, latencies, switches = [0], [], [0]
    stop = threading.Event()

    def runner(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(args.runs):
            t = r.choice(bundle.tasks)
            t0 = time.perf_counter()
            y = session.run(x, task=t)[0]
            latencies.append(time.perf_counter() - t0)
            if not np.array_equal(y, refs[t]):
                mismatches[0] += 1

    def switcher() -> None:
        r = random.Random(99)
        while not stop.is_set():
            session.switch(r.choice(bundle.tasks))
            switches[0] += 1

    sw = threading.Thread(target=switcher)
    workers = [threading.Thread(target=runner, args=(k,)) for k in range(args.threads)]
    t0 = time.perf_counter()
    sw.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    sw.join()
    secs = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    rows = [[str(args.threads), f"{len(latencies):,}", f"{switches[0]:,}", str(mismatches[0]),
             f"{np.percentile(lat, 50):.2f} ms", f"{np.percentile(lat, 99):.2f} ms", f"{secs:.1f} s"]]
    text = table(["run threads", "runs", "switches (other thread)", "mismatches (goal 0)", "latency p50", "latency p99", "wall"], rows)
    print(text)
    if not args.no_write:
        write_section("Concurrency under load",
                      f"`python bench/concurrency_bench.py --threads {args.threads} --runs {args.runs}` — commit {git_rev()}; "
                      f"an MLP of {DEPTH}×{WIDTH}², {args.tasks} tasks, ONNX Runtime CPU, every output compared bit for bit "
                      f"with its task's reference.\n\nMachine: {machine()}.\n\n{text}", RELIABILITY)

if __name__ == "__main__":
    main()
