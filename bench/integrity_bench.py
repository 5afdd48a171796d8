"""What checking a bundle's sha256 on first use costs (issue 13, item 3).

A ViT-B-sized bundle (86 M float32 parameters, 4 tasks, written to a temp file, page cache warm).
A "switch" here is the work every runtime does: the mask kernel over every merged parameter into
buffers allocated once. Measured side by side, best of --rounds, each first switch on a freshly
opened bundle: the first switch with verify="first-use" (the default) and with verify="off", a
later switches (a new task's masks, then nothing left to check), opening with verify="open", and sha256 alone over θ0 + τ.

    python bench/integrity_bench.py [--params-m 86] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

from edgemerge.bundle import write_bundle  # noqa: E402
from edgemerge.runtime import open_bundle  # noqa: E402
from edgemerge.runtime.kernel import apply_mask, kernel_name  # noqa: E402


def make(path: str, params_m: float, n_tasks: int) -> None:
    rng = np.random.default_rng(0)
    shapes = [(768, 768)] * int(params_m * 1e6 // (768 * 768))
    base = {f"p{i}": rng.standard_normal(s, dtype=np.float32) for i, s in enumerate(shapes)}
    vector = {k: (0.01 * v).astype(np.float32) for k, v in base.items()}
    masks = {f"t{t}": {k: np.packbits(rng.random(v.size) < 0.3) for k, v in base.items()} for t in range(n_tasks)}
    write_bundle(path, tasks={t: {} for t in masks}, base=base, vector=vector, masks=masks)


def switch(bundle, task: str, out: dict) -> float:
    t0 = time.perf_counter()
    bundle.check_file()
    for p in bundle.params:
        apply_mask(bundle.base(p.name), bundle.vector(p.name), bundle.packed_mask(task, p.name), out[p.name])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=float, default=86.0)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgemerge-integrity-") as d:
        path = os.path.join(d, "b.safetensors")
        make(path, args.params_m, args.tasks)
        probe = open_bundle(path, verify="off")
        out = {p.name: np.empty(p.shape, np.float32) for p in probe.params}
        n = sum(p.numel for p in probe.params)
        best = {k: float("inf") for k in ("first-use", "off", "other", "again", "open", "sha256")}
        for _ in range(args.rounds):
            for policy in ("first-use", "off"):
                b = open_bundle(path, verify=policy)
                best[policy] = min(best[policy], switch(b, "t0", out))
                if policy == "first-use":
                    best["other"] = min(best["other"], switch(b, "t1", out))  # only t1's masks are new
                    best["again"] = min(best["again"], switch(b, "t0", out))  # nothing left to check
                b.close()
            t0 = time.perf_counter()
            open_bundle(path, verify="open").close()
            best["open"] = min(best["open"], time.perf_counter() - t0)
            data = [np.asarray(probe.base(p.name)) for p in probe.params] + [np.asarray(probe.vector(p.name)) for p in probe.params]
            t0 = time.perf_counter()
            for a in data:
                hashlib.sha256(memoryview(a.reshape(-1).view(np.uint8))).digest()
            best["sha256"] = min(best["sha256"], time.perf_counter() - t0)
        nbytes = sum(a.nbytes for a in data)
    off = best["off"]
    rows = [
        ["first switch, verify off", f"{1e3 * off:.0f} ms", "1.00×", "the kernel alone"],
        ["first switch, verify first-use (default)", f"{1e3 * best['first-use']:.0f} ms", f"{best['first-use'] / off:.2f}×",
         "θ0, τ and t0's masks hashed once"],
        ["then a switch to another task", f"{1e3 * best['other']:.0f} ms", f"{best['other'] / off:.2f}×",
         "only that task's masks are new"],
        ["then a switch back", f"{1e3 * best['again']:.0f} ms", f"{best['again'] / off:.2f}×", "nothing left to check"],
        ["open with verify=open", f"{1e3 * best['open']:.0f} ms", "", "every tensor hashed up front"],
        ["sha256 of θ0 + τ alone", f"{1e3 * best['sha256']:.0f} ms", "", f"{nbytes / best['sha256'] / 1e9:.2f} GB/s, one core"],
    ]
    text = table(["what", "time", "vs verify off", "note"], rows)
    note = (f"{n / 1e6:.0f} M float32 parameters, {args.tasks} tasks, kernel {kernel_name()}, best of {args.rounds} rounds, "
            f"page cache warm")
    print(text)
    print(note, "; machine:", machine())
    if not args.no_write:
        write_section("Integrity checks (issue 13)", f"`python bench/integrity_bench.py` — {note}, commit {git_rev()}.\n\n"
                      f"Machine: {machine()}.\n\n{text}")


if __name__ == "__main__":
    main()
