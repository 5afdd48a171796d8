"""The conformance matrix as a table: docs/conformance.md (the cells tests/test_conformance.py asserts).

Every architecture × dtype, each through every merge method; a column per path. A column says
"exact" when every method's every task was byte-exact (or bit-exact outputs), the largest relative
difference from the torch forward of θ_t where outputs are compared with a tolerance, or how the
path refused (an edgemerge error naming the fix), and FAIL where a cell failed.

    python bench/conformance.py [--archs gpt2,bert] [--dtypes fp32] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import git_rev, machine, table  # noqa: E402

import matrix  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
COLUMNS = ["formats", "extract", "TaskSession inputs", "TaskSession few-rows", "TaskSession sessions", "TorchTaskModel numpy",
           "TorchTaskModel torch", "flat + C applier"]


def summarize(cells: list[matrix.Result], column: str) -> str:
    values = [c.paths.get(column, "missing") for c in cells]
    if any(c.failures and any(f.startswith(column) for f in c.failures) for c in cells):
        return "**FAIL**"
    if column in cells[0].worst:
        return f"≤ {max(c.worst[column] for c in cells):.1e}"
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else " / ".join(distinct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(matrix.ARCHS))
    ap.add_argument("--dtypes", default=",".join(matrix.DTYPES))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgemerge-conformance-") as d:
        results = matrix.run_matrix(Path(d), tuple(args.archs.split(",")), tuple(args.dtypes.split(",")))
    seconds = time.perf_counter() - t0
    rows = []
    for a in args.archs.split(","):
        for dt in args.dtypes.split(","):
            cells = [r for r in results if r.arch == a and r.dtype == dt]
            rows.append([a, dt, f"{sum(not c.failures for c in cells)}/{len(cells)}", *(summarize(cells, c) for c in COLUMNS)])
    text = table(["arch", "dtype", "cells ok", *COLUMNS], rows)
    failed = [f"{r.arch} {r.dtype} {r.method}: {f}" for r in results for f in r.failures]
    print(text)
    print(f"{len(results)} cells ({len(matrix.METHODS)} methods each), {len(failed)} failed, {seconds:.0f} s; machine: {machine()}")
    for f in failed:
        print("FAILED", f)
    if args.no_write:
        return
    archs = "\n".join(f"- **{a.name}**: {a.what}" for a in matrix.ARCHS.values())
    tol = ", ".join(f"{k} {v:.1e}" for k, v in matrix.TOLERANCE.items())
    DOC.write_text(f"""# Conformance matrix

Printed by `python bench/conformance.py` (commit {git_rev()}, {seconds:.0f} s for {len(results)} cells on {machine()});
`tests/test_conformance.py` asserts the same cells in CI. Source: `tests/matrix.py`.

Each row is one architecture in one dtype, built from a tiny `transformers` config (random init,
{matrix.N_TASKS} tasks, each a few real Adam steps on random labels), merged with every method
({", ".join(matrix.METHODS)}) from a safetensors file, a Hugging Face sharded folder and a
`torch.save` file. Each cell goes through: merge → verify → extract → ONNX export (switchable and
plain) → `TaskSession` (inputs and sessions mode) → `TorchTaskModel` (numpy/C and torch kernels, CPU)
→ flat image + the C applier, and every task's output is compared with a torch forward of θ_t,
θ_t rebuilt from the bundle's raw bytes with the `safetensors` library by docs/format.md §4.

{archs}

Columns: **formats** — the bundles merged from the three input formats have byte-identical tensors;
**extract** — `task_weights` equals the normative rule byte for byte; **TaskSession** — the largest
relative difference `max|y − ref| / max|ref|` over all tasks and methods (tolerance: {tol}; fp16
graphs round every op's output to 11 bits in another order than torch), or the clear refusal when
ONNX Runtime's CPU provider has no kernel for the dtype; **TorchTaskModel** — rebuilt weights and
outputs bit-identical to torch with θ_t; **flat + C applier** — the C program's θ_t equals the numpy
rebuild and, rounded to θ0's dtype, the bundle's θ_t.

{text}
""")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
