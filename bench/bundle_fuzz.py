"""Structured bundle mutants through every reader path (issue 13, item 6); counts go to docs/RELIABILITY.md.

Each mutant (tests/bundlefuzz.py) is opened with the default options; it must be refused with a
FormatError, or open -- and then `inspect` (the CLI), every task's weights and `export flat` raise
only edgemerge errors, the weights equal the original's, and the safetensors library opens it.

    python bench/bundle_fuzz.py [--mutants 20000] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import RELIABILITY, git_rev, machine, table, write_section  # noqa: E402

import bundlefuzz  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from edgemerge.cli import main as cli_main  # noqa: E402
from models import make_tiny_suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=int, default=20000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    counts = {"refused with FormatError": 0, "accepted, every path ran": 0, "other exception (a bug)": 0}
    with tempfile.TemporaryDirectory(prefix="edgemerge-bundlefuzz-") as tmp:
        d = Path(tmp)
        b = make_tiny_suite(d)
        data, original = open(b.path, "rb").read(), bundlefuzz.weights_of(b)
        rng, runner, t0 = np.random.default_rng(20), CliRunner(), time.perf_counter()
        for i in range(args.mutants):
            m = bundlefuzz.mutate(data, rng)
            try:
                kind = bundlefuzz.check(d / "m.safetensors", m, original, runner, cli_main)
                counts["refused with FormatError" if kind == "refused" else "accepted, every path ran"] += 1
            except Exception:  # noqa: BLE001 - the bench counts what the test would fail on
                counts["other exception (a bug)"] += 1
                print(f"mutant {i}:", traceback.format_exc(limit=-3))
        seconds = time.perf_counter() - t0
    text = table(["outcome", "mutants"], [[k, f"{v:,}"] for k, v in counts.items()])
    print(text)
    print(f"{args.mutants:,} mutants in {seconds:.0f} s; machine: {machine()}")
    if not args.no_write:
        write_section("Bundle reader: structured mutants (issue 13)",
                      f"`python bench/bundle_fuzz.py` — {args.mutants:,} mutants of a real 3-task bundle (header and "
                      "manifest edited as JSON: wrong types, list dtypes, deep nesting, 5,000-digit integers, shapes numpy "
                      "cannot hold, versions ≤ 0, broken aliases/checksums, renamed tensors; and byte flips), opened "
                      "with the default options; an accepted one must also pass `inspect`, every task's weights (equal "
                      "to the original's), `export flat` and the safetensors library's own reader. Commit "
                      f"{git_rev()}, {seconds:.0f} s. Machine: {machine()}.\n\n{text}", doc=RELIABILITY)


if __name__ == "__main__":
    main()
