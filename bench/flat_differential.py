"""The flat-image readers against each other, and the C applier on a large table (issue 13, items 4-5).

1. ``--mutants`` structured mutants of real images (tests/flatfuzz.py: every header and table field
   at boundary values, copied rows, duplicate task names, name bytes, data bytes, truncation), each
   read by the Python reader and the C applier for every task: counts of agreeing accepts,
   agreeing refusals and disagreements (goal: 0) go to docs/RELIABILITY.md.
2. A legitimate image with ``--entries`` table entries (small params, 3 tasks), rebuilt by the C
   applier (a subprocess, as a device runs it) and by the Python reader: seconds, side by side.

    python bench/flat_differential.py [--mutants 12000] [--entries 286600] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import RELIABILITY, git_rev, machine, table, write_section  # noqa: E402

import flatfuzz  # noqa: E402
from edgemerge.bundle import write_bundle  # noqa: E402
from edgemerge.export.flat import rebuild, write_flat  # noqa: E402


def fuzz(d: Path, n: int) -> dict[str, int]:
    lib, seeds = flatfuzz.build_library(d), flatfuzz.seed_images(d)
    rng = np.random.default_rng(12)
    counts = {"both accept, same bytes": 0, "both refuse": 0, "disagree": 0}
    for i in range(n):
        data, tasks = seeds[list(seeds)[i % len(seeds)]]
        m = flatfuzz.mutate(data, rng)
        if flatfuzz.compare(lib, d / "m.img", m, tasks):
            counts["disagree"] += 1
            print(f"DISAGREE on mutant {i}: {flatfuzz.compare(lib, d / 'm.img', m, tasks)}")
        elif flatfuzz.c_rebuild(lib, m, tasks[0]) is None:
            counts["both refuse"] += 1
        else:
            counts["both accept, same bytes"] += 1
    return counts


def large(d: Path, entries: int) -> tuple[float, float, int]:
    """A valid image of ``entries`` table rows: params of 8 floats, a vector and 3 masks each."""
    n_params = entries // 5
    rng = np.random.default_rng(0)
    base = {f"p{i:06d}": rng.standard_normal(8).astype(np.float32) for i in range(n_params)}
    vector = {k: (0.1 * v).astype(np.float32) for k, v in base.items()}
    masks = {f"t{t}": {k: np.packbits(rng.random(8) < 0.5) for k in base} for t in range(3)}
    write_bundle(d / "big.safetensors", tasks={t: {} for t in masks}, base=base, vector=vector, masks=masks)
    write_flat(str(d / "big.safetensors"), str(d / "big.img"))
    exe = d / "emflat_apply"
    subprocess.run(["cc", "-std=c99", "-O2", "-ffp-contract=off", "-o", str(exe), str(flatfuzz.ROOT / "edgemerge/devices/c/emflat.c")],
                   check=True)
    t0 = time.perf_counter()
    subprocess.run([str(exe), str(d / "big.img"), "t1", str(d / "big.out")], check=True)
    c_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = rebuild(str(d / "big.img"), "t1")
    py_s = time.perf_counter() - t0
    same = np.fromfile(d / "big.out", "<f4").tobytes() == np.concatenate(list(ref.values())).astype("<f4").tobytes()
    assert same, "C and Python rebuilt different bytes"
    return c_s, py_s, n_params * 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=int, default=12000)
    ap.add_argument("--entries", type=int, default=286_600)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgemerge-flatdiff-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        counts = fuzz(d, args.mutants)
        fuzz_s = time.perf_counter() - t0
        c_s, py_s, rows = large(d, args.entries)
    text = table(["outcome", "mutants"], [[k, f"{v:,}"] for k, v in counts.items()])
    speed = table(["reader", "seconds"], [[f"C applier (subprocess), {rows:,} entries", f"{c_s:.2f}"],
                                         [f"Python read_flat + rebuild, {rows:,} entries", f"{py_s:.2f}"]])
    print(text)
    print(speed)
    print(f"{args.mutants:,} mutants in {fuzz_s:.0f} s; machine: {machine()}")
    if not args.no_write:
        write_section("Flat image: Python reader vs C applier (issue 13)",
                      f"`python bench/flat_differential.py` — {args.mutants:,} structured mutants of real images "
                      f"(F32, F16 and Q16 encodings, 3 tasks; every task and an unknown one per mutant), commit {git_rev()}, "
                      f"{fuzz_s:.0f} s. Machine: {machine()}.\n\n{text}\n\nA legitimate image with {rows:,} table "
                      f"entries (the C applier checked entries pairwise before: 200 s for 286,600):\n\n{speed}",
                      doc=RELIABILITY)


if __name__ == "__main__":
    main()
