"""Accuracy kept by each merge method on the real text suite, over several seeds (issue 3).

Runs the demo pipeline (fine-tune -> merge -> TALL bundle -> evaluate) once per seed -- each seed
fine-tunes its own checkpoints (≈ 10 minutes a seed on 2 cores, cached afterwards) -- and reports
per method the mean normalized accuracy (merged / fine-tuned) with its spread over seeds, against
the goals: TALL ≥ 99.5% normalized on every task; Consensus ≥ task arithmetic + 3 points.

    python bench/accuracy_bench.py [--seeds 0,1,2] [--no-write]

The vision suite of the issue (EfficientNet-Lite0 on Fashion-MNIST / MNIST / digits) is not built
yet; this script says so in its output rather than reporting it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

from edgemerge.demo import LABELS, MERGED, DemoOptions, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            results.append(run_demo(DemoOptions(seed=seed, out=out, deploy=False)))
        print(f"seed {seed} done", flush=True)
    tasks = results[0].tasks
    methods = ["zero_shot", "finetuned", *MERGED, "tall"]
    rows = []
    for m in methods:
        norm = np.array([[r.normalized(m, t) for t in tasks] for r in results])     # seeds × tasks
        absolute = np.array([[r.accuracy[m][t] for t in tasks] for r in results])
        per_seed = 100 * norm.mean(axis=1)
        rows.append([LABELS[m], f"{100 * absolute.mean():.1f}", f"{per_seed.mean():.1f} ± {per_seed.std():.1f}",
                     f"{100 * norm.min():.1f}"] + [f"{100 * norm[:, i].mean():.1f}" for i in range(len(tasks))])
    text = table(["method", "mean acc %", "normalized % (mean ± sd over seeds)", "worst task-seed %", *tasks], rows)
    tall_min = min(r.normalized("tall", t) for r in results for t in tasks)
    mean_norm = {m: 100 * np.mean([[r.normalized(m, t) for t in tasks] for r in results]) for m in MERGED}
    goals = [
        f"TALL ≥ 99.5% normalized on every task and seed: worst {100 * tall_min:.1f}% — {'met' if tall_min >= 0.995 else 'MISSED'}.",
        f"Consensus ≥ task arithmetic + 3 points: Cons-TA {mean_norm['consensus_ta'] - mean_norm['task_arithmetic']:+.1f}, "
        f"Cons-TIES {mean_norm['consensus_ties'] - mean_norm['task_arithmetic']:+.1f} points (normalized) — "
        f"{'met' if max(mean_norm['consensus_ta'], mean_norm['consensus_ties']) >= mean_norm['task_arithmetic'] + 3 else 'MISSED'}.",
        "Zero-shot → fine-tuned gap per task (mean over seeds): " + ", ".join(
            f"{t} {100 * np.mean([r.accuracy['finetuned'][t] - r.accuracy['zero_shot'][t] for r in results]):+.1f}" for t in tasks),
        "Task-vector cosine (max off-diagonal, any seed): " + f"{max(abs(c) for r in results for i, row in enumerate(r.cosine) for j, c in enumerate(row) if i != j):.3f}",
        "Vision suite (EfficientNet-Lite0): not built yet — no figures.",
    ]
    print(text)
    print("\n".join(goals))
    print(f"machine: {machine()}")
    if not args.no_write:
        o = DemoOptions()
        write_section("Accuracy on the real text suite (issue 3)",
                      f"`python bench/accuracy_bench.py --seeds {args.seeds}` — commit {git_rev()}; all-MiniLM-L6-v2, "
                      f"{o.steps} fine-tuning steps of 16 at lr {o.lr:g} (LP-FT), test {o.test} / val {o.val} items per task, "
                      f"merge scale α and TALL λ_t chosen on validation. Seeds: {seeds}.\n\nMachine: {machine()}.\n\n"
                      + text + "\n\n" + "\n".join(f"- {g}" for g in goals))


if __name__ == "__main__":
    main()
