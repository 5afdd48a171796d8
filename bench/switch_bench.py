"""Task switching on ONNX Runtime (issue 4): our switch vs a memcpy and vs loading a per-task ONNX file.

Models, each measured side by side in one run:
- vit-b: a ViT-B/16-sized classifier (86 M parameters, generated on the fly), 8 tasks;
- minilm: all-MiniLM-L6-v2 (22.7 M), the demo's five fine-tuned text tasks (from the demo cache;
  built first if missing, which takes ≈ 6 minutes).

Per model: memcpy of the merged weights; our switch (weights-as-inputs mode) p50/p95; the
baseline a user would pick today (create an InferenceSession from that task's own ONNX file,
page cache warm); the per-task-session mode's first switch (session build) and later switches;
inference latency after a switch in each mode vs the plain ONNX model with initializers; storage.

    python bench/switch_bench.py [--models vit-b,minilm] [--tasks 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402


def p50(xs):
    return float(np.median(xs))


def p95(xs):
    return float(np.percentile(xs, 95))


def make_vit_suite(directory: str, n_tasks: int):
    import torch

    from edgemerge.io import write_safetensors
    from vit import ViT

    torch.manual_seed(0)
    model = ViT()
    base = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.startswith("head.")}
    write_safetensors(os.path.join(directory, "base.safetensors"), base, checksums=False)
    rng = np.random.default_rng(0)
    tasks = {}
    for t in range(n_tasks):
        sd = {k: v + rng.laplace(0, 1e-3, v.shape).astype(np.float32) for k, v in base.items()}
        sd["head.weight"] = rng.standard_normal((10, 768), dtype=np.float32) * 0.02
        sd["head.bias"] = np.zeros(10, np.float32)
        tasks[f"task{t}"] = os.path.join(directory, f"task{t}.safetensors")
        write_safetensors(tasks[f"task{t}"], sd, checksums=False)
    return os.path.join(directory, "base.safetensors"), tasks


def minilm_suite():
    from edgemerge.suites.suite import SuiteConfig, build_suite

    suite = build_suite(SuiteConfig())
    t = suite.config.tasks[0]
    (ids, mask), _ = suite.data[t]["test"].batches[len(suite.data[t]["test"].batches) // 2]
    return suite.base, dict(suite.checkpoints), {"input_ids": ids[:8], "attention_mask": mask[:8]}


def measure(name: str, base: str, tasks: dict, factory, inputs, input_names, axes, directory: str, baseline_tasks: int):
    import onnxruntime as ort

    from edgemerge.export.onnx import export_onnx
    from edgemerge.measure import memcpy_seconds
    from edgemerge.pipeline import MergeConfig, merge
    from edgemerge.runtime import open_bundle
    from edgemerge.runtime.session import TaskSession

    bundle_path = os.path.join(directory, f"{name}.safetensors")
    merge(MergeConfig(base, tasks, "task_arithmetic", private=("head.*",)), bundle_path)
    bundle = open_bundle(bundle_path)
    n_params = sum(p.numel for p in bundle.params if p.role == "merged")
    exp = export_onnx(bundle, factory, directory, input_names=input_names, output_names=["logits"], dynamic_axes=axes, name=name)
    per_task = [export_onnx(bundle, factory, directory, task=t, switchable=False, input_names=input_names,
                            output_names=["logits"], dynamic_axes=axes, name=name).plain for t in bundle.tasks[:baseline_tasks]]
    copy = memcpy_seconds(bundle, 7)

    ours = TaskSession(bundle, exp.switchable)
    ours.run(inputs, task=bundle.tasks[0])
    switch, infer_ours = [], []
    for _ in range(3):
        for t in bundle.tasks:
            switch.append(ours.switch(t))  # right after inference, as in use (spin-wait off: our default)
            infer_ours += [_timed(lambda: ours.run(inputs)) for _ in range(2)]
    time.sleep(1.0)  # let ONNX Runtime's worker threads stop spin-waiting
    quiet = [ours.switch(t) for _ in range(2) for t in bundle.tasks]
    del ours
    opts = ort.SessionOptions()  # ONNX Runtime's own default: workers spin-wait after a run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    spin = TaskSession(bundle, exp.switchable, session_options=opts)
    spin.run(inputs, task=bundle.tasks[0])
    switch_spin, infer_spin = [], []
    for t in bundle.tasks:
        switch_spin.append(spin.switch(t))
        infer_spin += [_timed(lambda: spin.run(inputs)) for _ in range(2)]
    del spin

    load, infer_plain = [], []
    for path in per_task:
        ort.InferenceSession(path).run(None, inputs)  # warm the page cache and the allocator
    for path in per_task:
        t0 = time.perf_counter()
        sess = ort.InferenceSession(path)
        load.append(time.perf_counter() - t0)
        sess.run(None, inputs)
        infer_plain += [_timed(lambda: sess.run(None, inputs)) for _ in range(3)]

    heads = {tuple(bundle.private(t)[k].shape) for t in bundle.tasks for k in bundle.private_keys[t]}
    first = again = infer_per = None
    if len(heads) <= len({k for t in bundle.tasks for k in bundle.private_keys[t]}):  # one head shape per key
        per = TaskSession(bundle, exp.plain, mode="sessions")
        first = [per.switch(t) for t in bundle.tasks[:baseline_tasks]]
        again = [per.switch(t) for t in bundle.tasks[:baseline_tasks]]
        infer_per = []
        for t in bundle.tasks[:baseline_tasks]:
            per.switch(t)
            per.run(inputs)
            infer_per += [_timed(lambda: per.run(inputs)) for _ in range(3)]
        del per

    files = os.path.getsize(per_task[0]) * len(bundle.tasks)
    ours_bytes = os.path.getsize(bundle_path) + os.path.getsize(exp.switchable)
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    rows = [
        ["memcpy of the merged weights", ms(p50(copy)), f"{n_params / 1e6:.1f} M params, {4 * n_params / 2**20:.0f} MiB"],
        ["our switch right after inference, p50 / p95", f"{ms(p50(switch))} / {ms(p95(switch))}", f"{p50(switch) / p50(copy):.2f}× memcpy (goal ≤ 1.5×)"],
        ["our switch, idle runtime, p50", ms(p50(quiet)), f"{p50(quiet) / p50(copy):.2f}× memcpy"],
        ["our switch with ORT's default spin-wait on, p50", ms(p50(switch_spin)),
         f"{p50(switch_spin) / p50(copy):.2f}× memcpy; inference then {ms(p50(infer_spin))} (why the default is off)"],
        ["baseline: new session from the task's ONNX file", ms(p50(load)), f"our switch is {p50(load) / p50(switch):.1f}× faster after inference, "
         f"{p50(load) / p50(quiet):.1f}× idle (goal ≥ 20×)"],
        ["per-task sessions: first switch (build) / later",
         "n/a" if first is None else f"{ms(p50(first))} / {1e3 * p50(again):.3f} ms",
         "task heads differ in shape: one plain graph cannot serve them" if first is None else f"memory: {len(bundle.tasks)} copies of the weights"],
        ["inference, plain ONNX (initializers)", ms(p50(infer_plain)), "reference"],
        ["inference, weights as inputs", ms(p50(infer_ours)), f"{p50(infer_ours) / p50(infer_plain):.2f}× plain (goal ≤ 1.05×)"],
        ["inference, per-task sessions", "n/a" if infer_per is None else ms(p50(infer_per)),
         "" if infer_per is None else f"{p50(infer_per) / p50(infer_plain):.2f}× plain"],
        ["storage: bundle + switchable graph", f"{ours_bytes / 2**20:.0f} MiB", f"{100 * ours_bytes / files:.0f}% of the per-task files"],
        [f"storage: {len(bundle.tasks)} per-task ONNX files", f"{files / 2**20:.0f} MiB", ""],
    ]
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit-b,minilm")
    ap.add_argument("--tasks", type=int, default=8, help="tasks for the synthetic ViT-B")
    ap.add_argument("--baseline-tasks", type=int, default=3, help="tasks exported as separate ONNX files for the baseline")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="edgemerge-switch-")
    sections = []
    try:
        for name in args.models.split(","):
            if name == "vit-b":
                import torch
                from vit import IMAGE, factory

                base, tasks = make_vit_suite(directory, args.tasks)
                inputs = {"image": np.random.default_rng(0).standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)}
                rows = measure(name, base, tasks, factory, inputs, ["image"], {"image": {0: "batch"}, "logits": {0: "batch"}},
                               directory, args.baseline_tasks)
            elif name == "minilm":
                from edgemerge.suites import text_model

                base, tasks, inputs = minilm_suite()
                axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
                rows = measure(name, base, tasks, text_model.onnx_factory, inputs, ["input_ids", "attention_mask"], axes,
                               directory, args.baseline_tasks)
            else:
                raise SystemExit(f"unknown model {name!r}; valid: vit-b, minilm")
            text = table(["measure", "value", "note"], rows)
            print(f"\n### {name}\n\n{text}")
            sections.append(f"### {name}\n\n{text}")
        print(f"\nmachine: {machine()}")
        if not args.no_write:
            write_section("Task switching on ONNX Runtime (issue 4)",
                          f"`python bench/switch_bench.py` — commit {git_rev()}, batch 1 image (ViT) / 8 sentences (MiniLM), "
                          f"ONNX Runtime CPU, measured side by side in one run.\n\nMachine: {machine()}.\n\n" + "\n\n".join(sections))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
