"""Accuracy kept by each merge method on the real suites, over several seeds (issue 3).

Runs the demo pipeline (fine-tune -> merge -> TALL bundle -> evaluate) once per suite and seed --
each seed fine-tunes its own checkpoints (text ≈ 10 minutes a seed on 2 cores, vision ≈ 2.5;
cached afterwards) -- and reports per method the mean normalized accuracy (merged / fine-tuned)
with its spread over seeds, against the goals: TALL ≥ 99.5% normalized on every task; Consensus ≥
task arithmetic + 3 points. The learning rate and step budget are printed with every result.

    python bench/accuracy_bench.py [--suites text,vision] [--seeds 0,1,2] [--no-write]
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
from edgemerge.suites.suite import get_kind  # noqa: E402


def report(suite: str, results: list) -> tuple[str, list[str]]:
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
    best_cons = max(mean_norm["consensus_ta"], mean_norm["consensus_ties"])
    o = results[0].options
    goals = [
        f"Fine-tuning: {o['steps']} steps at lr {o['lr']:g}; test {o['test']} / val {o['val']} items per task.",
        f"TALL ≥ 99.5% normalized on every task and seed: worst {100 * tall_min:.1f}% — {'met' if tall_min >= 0.995 else 'MISSED'}.",
        f"Consensus ≥ task arithmetic + 3 points: Cons-TA {mean_norm['consensus_ta'] - mean_norm['task_arithmetic']:+.1f}, "
        f"Cons-TIES {mean_norm['consensus_ties'] - mean_norm['task_arithmetic']:+.1f} points (normalized) — "
        f"{'met' if best_cons >= mean_norm['task_arithmetic'] + 3 else 'MISSED'}.",
        "Zero-shot → fine-tuned gap per task (mean over seeds): " + ", ".join(
            f"{t} {100 * np.mean([r.accuracy['finetuned'][t] - r.accuracy['zero_shot'][t] for r in results]):+.1f}" for t in tasks),
        "Task-vector cosine (max off-diagonal, any seed): " + f"{max(abs(c) for r in results for i, row in enumerate(r.cosine) for j, c in enumerate(row) if i != j):.3f}",
        "TALL λ_t chosen per seed: " + "; ".join(", ".join(f"{t} {v}" for t, v in r.tall_lambda.items()) for r in results) + ".",
    ]
    return text, goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="text,vision")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for suite in args.suites.split(","):
        results = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as out:
                results.append(run_demo(DemoOptions(suite=suite, seed=seed, out=out, deploy=False)))
            print(f"{suite} seed {seed} done", flush=True)
        text, goals = report(suite, results)
        print(f"\n### {suite}\n\n{text}\n" + "\n".join(goals))
        print(f"machine: {machine()}")
        if not args.no_write:
            write_section(f"Accuracy on the real {suite} suite (issue 3)",
                          f"`python bench/accuracy_bench.py --suites {suite} --seeds {args.seeds}` — commit {git_rev()}; "
                          f"{get_kind(suite).label}; merge scale α and TALL λ_t chosen on validation. Seeds: {seeds}.\n\n"
                          f"Machine: {machine()}.\n\n" + text + "\n\n" + "\n".join(f"- {g}" for g in goals))


if __name__ == "__main__":
    main()
