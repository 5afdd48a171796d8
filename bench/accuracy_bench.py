"""Accuracy kept and predictions shared by each merge method on the real suites, over seeds (issue 14).

Runs the demo pipeline (fine-tune -> merge -> TALL bundle -> evaluate) once per suite and seed --
each seed fine-tunes its own checkpoints (cached afterwards) -- and reports per method the mean
normalized accuracy (merged / fine-tuned) with its spread over seeds, and the prediction agreement
with each task's own fine-tuned checkpoint on the test split (mean, worst task-seed, and the mean ±
of one task-seed's figure). Goals checked (issue 14): vision ≥ 8 tasks; mean fine-tune gain over
the zero-shot head ≥ 5 points; task arithmetic ≥ 5 points below fine-tuned (normalized); the TALL
λ_t strictly inside its grid for ≥ 80% of task-seeds. The learning rate and step budget are
printed with every result.

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

from edgemerge.demo import ALPHAS, LABELS, MERGED, TALL_LAMBDAS, DemoOptions, run_demo  # noqa: E402
from edgemerge.suites.suite import get_kind, task_steps  # noqa: E402


def _inside(value: float, grid: tuple[float, ...]) -> bool:
    return grid[0] < value < grid[-1]


def report(suite: str, results: list) -> tuple[str, list[str]]:
    tasks = results[0].tasks
    methods = ["zero_shot", "finetuned", *MERGED, "tall"]
    rows = []
    for m in methods:
        norm = np.array([[r.normalized(m, t) for t in tasks] for r in results])     # seeds × tasks
        absolute = np.array([[r.accuracy[m][t] for t in tasks] for r in results])
        agree = np.array([[r.agreement[m][t][0] for t in tasks] for r in results])
        err = np.array([[r.agreement[m][t][1] for t in tasks] for r in results])
        per_seed = 100 * norm.mean(axis=1)
        rows.append([LABELS[m], f"{100 * absolute.mean():.1f}", f"{per_seed.mean():.1f} ± {per_seed.std():.1f}",
                     f"{100 * norm.min():.1f}", f"{100 * agree.mean():.1f}", f"{100 * agree.min():.1f}",
                     f"± {100 * err.mean():.1f}"] + [f"{100 * norm[:, i].mean():.1f}" for i in range(len(tasks))])
    text = table(["method", "mean acc %", "normalized % (mean ± sd over seeds)", "worst task-seed %",
                  "agreement %", "worst agreement %", "± per task-seed", *tasks], rows)
    mean_norm = {m: 100 * np.mean([[r.normalized(m, t) for t in tasks] for r in results]) for m in [*MERGED, "tall"]}
    gain = {t: 100 * np.mean([r.accuracy["finetuned"][t] - r.accuracy["zero_shot"][t] for r in results]) for t in tasks}
    mean_gain = float(np.mean(list(gain.values())))
    ta_loss = 100 - mean_norm["task_arithmetic"]
    lam = [r.tall_lambda[t] for r in results for t in tasks]
    inside = np.mean([_inside(v, TALL_LAMBDAS) for v in lam])
    alpha_edge = sum(not _inside(r.alpha[m], ALPHAS) for r in results for m in MERGED)
    tall_min = min(r.normalized("tall", t) for r in results for t in tasks)
    o = results[0].options
    n_test = results[0].test_items
    goals = [
        f"Fine-tuning: {o['steps']} steps at lr {o['lr']:g}"
        + "".join(f" ({t}: {task_steps(get_kind(suite), t, o['steps'])})" for t in tasks
                  if task_steps(get_kind(suite), t, o['steps']) != o['steps'])
        + "; test items per task: "
        + ", ".join(f"{t} {n_test[t]}" for t in tasks) + f"; val {o['val']}.",
        f"Tasks: {len(tasks)}" + (" (goal ≥ 8 — met)." if len(tasks) >= 8 else (" (goal ≥ 8 — MISSED)." if suite == "vision" else ".")),
        f"Fine-tune gain over the zero-shot head, mean over tasks and seeds: {mean_gain:+.1f} points (goal ≥ 5 — "
        f"{'met' if mean_gain >= 5 else 'MISSED'}); per task: " + ", ".join(f"{t} {g:+.1f}" for t, g in gain.items())
        + f" ({sum(g >= 5 for g in gain.values())}/{len(tasks)} tasks ≥ 5).",
        f"Task arithmetic at its best α: {mean_norm['task_arithmetic']:.1f}% normalized, {ta_loss:.1f} points below "
        f"fine-tuned (goal ≥ 5 — {'met' if ta_loss >= 5 else 'MISSED'}).",
        f"TALL λ_t strictly inside the grid {list(TALL_LAMBDAS)}: {100 * inside:.0f}% of {len(lam)} task-seeds "
        f"(goal ≥ 80% — {'met' if inside >= 0.8 else 'MISSED'}); chosen per seed: "
        + "; ".join(", ".join(f"{t} {v:g}" for t, v in r.tall_lambda.items()) for r in results) + ".",
        f"Merge scale α on the edge of {list(ALPHAS)}: {alpha_edge} of {len(results) * len(MERGED)} method-seeds; chosen: "
        + "; ".join(", ".join(f"{LABELS[m]} {r.alpha[m]:g}" for m in MERGED) for r in results) + ".",
        f"TALL bundle: {mean_norm['tall']:.1f}% normalized on average, worst task-seed {100 * tall_min:.1f}%; "
        f"best single merged model {max(mean_norm[m] for m in MERGED):.1f}%.",
        "Task-vector cosine (max off-diagonal, any seed): "
        + f"{max(abs(c) for r in results for i, row in enumerate(r.cosine) for j, c in enumerate(row) if i != j):.3f}",
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
            write_section(f"Accuracy on the real {suite} suite (issue 14)",
                          f"`python bench/accuracy_bench.py --suites {suite} --seeds {args.seeds}` — commit {git_rev()}; "
                          f"{get_kind(suite).label}; merge scale α and TALL λ_t chosen on validation. Seeds: {seeds}. "
                          "Normalized = accuracy / fine-tuned accuracy; agreement = share of test items on which the method "
                          "predicts what the task's fine-tuned checkpoint predicts.\n\n"
                          f"Machine: {machine()}.\n\n" + text + "\n\n" + "\n".join(f"- {g}" for g in goals))


if __name__ == "__main__":
    main()
