"""How long `edgemerge demo` takes the first time (empty cache) and the next time (issues 3, 14).

Runs the real command twice in a subprocess with a fresh, temporary ``EDGEMERGE_CACHE``: the first
run fine-tunes every task, merges and evaluates from nothing; the second reuses the checkpoints,
merged bundles and evaluations. Wall time is measured around the whole process (interpreter and
imports included); the stage times come from the run's own ``results.json``. Goals: first run
≤ 10 minutes, later runs ≤ 1 minute, on 2 cores.

    python bench/demo_time.py [--suite vision|text] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

from edgemerge.suites.suite import cache_root  # noqa: E402

GOALS = {"first": 600.0, "later": 60.0}


def run(suite: str, cache: str, out: str) -> tuple[float, dict]:
    env = {**os.environ, "EDGEMERGE_CACHE": cache}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemerge", "demo", "--suite", suite, "--out", out],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"edgemerge demo failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "results.json")) as f:
        return wall, json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="vision", choices=("text", "vision"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgemerge-demo-time-") as tmp:
        cache = os.path.join(tmp, "cache")
        debian = os.path.join(cache_root(), "debian")
        if os.path.isdir(debian):  # the vision suite's Debian data, when installed without root
            os.makedirs(cache)
            os.symlink(debian, os.path.join(cache, "debian"))
        for label in ("first", "later"):
            wall, r = run(args.suite, cache, os.path.join(tmp, label))
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items() if k != "total")
            ok = "met" if wall <= GOALS[label] else "MISSED"
            rows.append([f"{label} run", f"{wall:.0f} s", f"≤ {GOALS[label]:.0f} s — {ok}",
                         f"{len(r['built'])} tasks fine-tuned, {r['evaluations']} accuracies computed", stages])
            print(f"{label}: {wall:.1f} s ({stages})", flush=True)
    text = table(["run", "wall (whole process)", "goal", "work done", "stages (from results.json)"], rows)
    print(f"\n{text}\nmachine: {machine()}")
    if not args.no_write:
        write_section(f"Demo time, {args.suite} suite (issues 3, 14)",
                      f"`python bench/demo_time.py --suite {args.suite}` — commit {git_rev()}; `edgemerge demo` run twice "
                      f"in a subprocess with an empty cache, then with the first run's cache.\n\nMachine: {machine()}.\n\n" + text)


if __name__ == "__main__":
    main()
