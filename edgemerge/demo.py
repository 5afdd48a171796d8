"""``edgemerge demo``: the whole product on a real model and real data, end to end.

1. Build (or reuse) a suite: EfficientNet-Lite0 fine-tuned on eight image tasks (the default: the
   edge-typical suite, where one merged model loses most), or all-MiniLM-L6-v2 on five text tasks
   (``--suite text``); CPU, fixed seed.
2. Merge with task arithmetic, TIES, Consensus-TA/TIES (scale α chosen on validation data) and
   build the TALL bundle (λ_t chosen per task on validation data).
3. Test accuracy per task: zero-shot (θ0 + a head fit on frozen features), fine-tuned, each
   merged model, the TALL bundle; absolute and normalized (= merged / fine-tuned).
4. Deploy: export one switchable ONNX graph, switch through every task in ONNX Runtime, check the
   device path's accuracy equals the bundle's accuracy in torch; switch latency and storage.
5. A Markdown report and PNG plots in the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, unknown_name
from .io import atomic_output
from .pipeline import MergeConfig, merge
from .runtime import open_bundle
from .suites.suite import SUITES, agreement, predict
ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
# TALL's λ grid, wider than the paper's 0.2-0.6: on the vision suite every task chose 0.6, its edge
TALL_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 3.0)
MERGED = ("task_arithmetic", "ties", "consensus_ta", "consensus_ties")
# per-task codecs the report sets beside the TALL bundle (format v2; bench/frontier_bench.py has more)
DEMO_CODECS = ("tswitch:density=0.1", "tswitch:density=0.3", "delta:dtype=I4,codes=xz")
LABELS = {"zero_shot": "zero-shot", "finetuned": "fine-tuned", "task_arithmetic": "TA", "ties": "TIES",
          "consensus_ta": "Cons-TA", "consensus_ties": "Cons-TIES", "tall": "TALL bundle"}


@dataclass
class DemoOptions:
    suite: str = "vision"
    tasks: tuple[str, ...] | None = None
    out: str = "edgemerge-demo"
    seed: int = 0
    steps: int | None = None   # None: the suite's default (vision 300, text 200)
    lr: float | None = None
    test: int | None = None
    val: int | None = None
    deploy: bool = True

    def validate(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(unknown_name("suite", self.suite, SUITES))
        for name in ("steps", "test", "val"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("--lr must be positive")


@dataclass
class DemoResult:
    tasks: list[str]
    classes: dict[str, int]
    accuracy: dict[str, dict[str, float]]            # method -> task -> test accuracy
    agreement: dict[str, dict[str, list[float]]]      # method -> task -> [agreement with fine-tuned, its ±]
    alpha: dict[str, float]                           # merged method -> α chosen on validation
    tall_lambda: dict[str, float]
    tall_density: dict[str, float]
    test_items: dict[str, int]
    cosine: list[list[float]]
    storage: dict[str, int]
    deploy: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)     # tasks fine-tuned in this run (others: cache)
    evaluations: int = 0                                # accuracies computed in this run (others: cache)
    codecs: dict[str, dict[str, Any]] = field(default_factory=dict)  # codec -> bytes, bits, per-task accuracy, agreement

    def normalized(self, method: str, task: str) -> float:
        ft = self.accuracy["finetuned"][task]
        return self.accuracy[method][task] / ft if ft else float("nan")


def _load(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def task_vector_cosines(base: dict[str, np.ndarray], ckpts: list[dict[str, np.ndarray]]) -> np.ndarray:
    n = len(ckpts)
    gram = np.zeros((n, n))
    for k, b in base.items():
        taus = np.stack([c[k].astype(np.float64).reshape(-1) - b.astype(np.float64).reshape(-1) for c in ckpts])
        gram += taus @ taus.T
    norms = np.sqrt(np.diag(gram))
    return gram / np.maximum(np.outer(norms, norms), 1e-30)


def _reusable(path: str, cfg: MergeConfig) -> bool:
    """A merged bundle from an earlier run counts only if it was made from these very checkpoints
    (sha256 in its manifest) with the same method, parameters, mask policy and λ grid."""
    from .checkpoints import file_sha256
    from .methods import get_method

    if not os.path.exists(path):
        return False
    try:
        with open_bundle(path) as b:
            m = b.manifest
            same = (m["method"]["name"] == cfg.method and m["method"]["params"] == get_method(cfg.method).resolve(cfg.params)
                    and m["mask"]["policy"] == cfg.masks and [t["name"] for t in m["tasks"]] == list(cfg.tasks)
                    and (cfg.masks == "none" or m["mask"]["lambda_grid"] == [float(x) for x in cfg.lambdas])
                    and m["base"]["sha256"] == file_sha256(cfg.base)
                    and all(t["source"]["sha256"] == file_sha256(cfg.tasks[t["name"]]) for t in m["tasks"]))
    except Exception:  # an unreadable or foreign file is simply rebuilt
        return False
    return same


def _scaled(bundle, alpha: float) -> dict[str, np.ndarray]:
    """θ0 + α·τ_MTL for every merged param (no masks); carried params as θ0. Heads not included."""
    out = {}
    for p in bundle.params:
        b = np.asarray(bundle.base(p.name))
        out[p.name] = b if p.role == "carried" else (b + np.float32(alpha) * bundle.vector(p.name).astype(np.float32)).astype(b.dtype)
    return out


def _with_head(bundle, shared: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    return {**shared, **{k: np.asarray(v) for k, v in bundle.private(task).items()}}


def run_demo(opts: DemoOptions, progress: Callable[[str, int, int], None] | None = None) -> DemoResult:
    from .suites.suite import Evaluator, SuiteConfig, build_suite

    opts.validate()
    t_start = time.perf_counter()
    cfg = SuiteConfig(opts.suite, tuple(opts.tasks) if opts.tasks else None, opts.seed, opts.steps, opts.lr,
                      opts.test, opts.val).resolved()
    suite = build_suite(cfg, progress)
    ev = Evaluator(suite)
    seconds = {"build suite": time.perf_counter() - t_start}
    tasks = list(cfg.tasks)
    os.makedirs(opts.out, exist_ok=True)
    base = _load(suite.base)
    ckpts = {t: _load(suite.checkpoints[t]) for t in tasks}
    acc: dict[str, dict[str, float]] = {}
    agree: dict[str, dict[str, list[float]]] = {}
    reference: dict[str, np.ndarray] = {}

    def measure(method: str, task: str, weights: dict[str, np.ndarray]) -> None:
        """Test accuracy, and agreement with the task's fine-tuned predictions."""
        pred = ev.predictions(task, "test", weights)
        acc.setdefault(method, {})[task] = float((pred == suite.data[task]["test"].labels).mean())
        reference.setdefault(task, pred)  # the first model measured per task is the fine-tuned one
        agree.setdefault(method, {})[task] = list(agreement(pred, reference[task]))

    for i, t in enumerate(tasks):
        measure("finetuned", t, ckpts[t])
        measure("zero_shot", t, {**base, **_load(suite.probes[t])})
        if progress:
            progress("evaluate inputs", i + 1, len(tasks))
    cos = task_vector_cosines(base, [{k: c[k] for k in base} for c in ckpts.values()])
    del ckpts
    seconds["evaluate inputs"] = time.perf_counter() - t_start - sum(seconds.values())

    def score(task: str, lam: float, weights: dict[str, np.ndarray]) -> float:
        return ev.accuracy(task, "val", weights)

    bundles, alpha = {}, {}
    t0 = time.perf_counter()
    steps, step = len(MERGED) * (len(ALPHAS) + 1) + 1, 0  # per method: α candidates, then the test split

    def tick() -> None:
        nonlocal step
        step += 1
        if progress:
            progress("select α + test", step, steps)

    for method in MERGED:
        masks = "tall" if method == "task_arithmetic" else "none"  # only the TALL bundle keeps masks
        cfg_m = MergeConfig(suite.base, dict(suite.checkpoints), method, masks=masks, private=(suite.kind.head,),
                            lambdas=TALL_LAMBDAS)
        path = os.path.join(suite.config.folder, "merged", f"{method}-{'+'.join(tasks)}.safetensors")
        if not _reusable(path, cfg_m):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            merge(cfg_m, path, score=score, progress=progress)
        b = bundles[method] = open_bundle(path)
        val = {}
        for a in ALPHAS:  # the scaled model is shared by every task; only the head changes
            shared = _scaled(b, a)
            val[a] = np.mean([ev.accuracy(t, "val", _with_head(b, shared, t)) for t in tasks])
            tick()
        alpha[method] = best = max(ALPHAS, key=lambda a: (val[a], -a))
        shared = _scaled(b, best)
        for t in tasks:
            measure(method, t, _with_head(b, shared, t))
        tick()
        del shared
        ev.save()
    shutil.copyfile(bundles["task_arithmetic"].path, os.path.join(opts.out, "tasks.safetensors"))
    tall = open_bundle(os.path.join(opts.out, "tasks.safetensors"))
    bundles["tall"] = tall
    for t in tasks:
        measure("tall", t, tall.task_weights(t))
    tick()
    ev.save()
    seconds["merge + select + evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    codecs = _codec_frontier(suite, tasks, bundles["task_arithmetic"].path, measure, acc, agree, progress)
    ev.save()
    seconds["codecs"] = time.perf_counter() - t0
    info = {t["name"]: t for t in tall.manifest["tasks"]}
    task_bytes = sum(os.path.getsize(suite.checkpoints[t]) for t in tasks)
    storage = {"n_checkpoints": task_bytes, "tall_bundle": os.path.getsize(tall.path),
               "one_merged_model": os.path.getsize(suite.base) + sum(
                   v.nbytes for t in tasks for v in tall.private(t).values())}
    acc = {m: acc[m] for m in ("zero_shot", "finetuned", *MERGED, "tall")}  # the report's order
    result = DemoResult(tasks, {t: len(suite.classes[t]) for t in tasks}, acc, agree, alpha,
                        {t: info[t]["lambda"] for t in tasks}, {t: info[t]["density"] for t in tasks},
                        {t: len(suite.data[t]["test"].labels) for t in tasks},
                        cos.round(4).tolist(), storage, seconds=seconds, options={**asdict(opts), **asdict(cfg)},
                        built=list(suite.build_seconds), evaluations=ev.computed, codecs=codecs)
    if opts.deploy:
        t0 = time.perf_counter()
        result.deploy = deploy(tall, suite, os.path.join(opts.out, "onnx"), acc["tall"])
        seconds["deploy (ONNX Runtime)"] = time.perf_counter() - t0
    for b in bundles.values():
        b.close()
    seconds["total"] = time.perf_counter() - t_start
    write_report(result, opts.out)
    return result


def _codec_frontier(suite, tasks, v1: str, measure, acc, agree, progress) -> dict[str, dict[str, Any]]:
    """Each of DEMO_CODECS for every task (a v2 bundle next to the merged ones, reused while the
    TALL bundle is unchanged), measured like the methods: bytes, bits per param per task, accuracy."""
    from .codecs import encode_bundle, parse_codec
    from .inspect import bits_per_param_per_task

    with open_bundle(v1) as b:
        out = {"tall (the v1 bundle)": {"bundle_bytes": os.path.getsize(v1), "bits_per_param_task": bits_per_param_per_task(b),
                                        "accuracy": dict(acc["tall"]), "agreement": dict(agree["tall"])}}
    for i, label in enumerate(DEMO_CODECS):
        path = os.path.join(os.path.dirname(v1), f"codec-{label.replace(':', '-').replace(',', '-')}-{'+'.join(tasks)}.safetensors")
        if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(v1):
            encode_bundle(v1, dict(suite.checkpoints), {t: parse_codec(label) for t in tasks}, path)
        with open_bundle(path) as b:
            for t in tasks:
                measure(label, t, b.task_weights(t))
            out[label] = {"bundle_bytes": os.path.getsize(path), "bits_per_param_task": bits_per_param_per_task(b),
                          "accuracy": acc.pop(label), "agreement": agree.pop(label)}
        if progress:
            progress("codecs", i + 1, len(DEMO_CODECS))
    return out


CLIENT = '''"""Example client for the bundle the edgemerge demo wrote: one of its tasks on ONNX Runtime.

Needs numpy, onnxruntime and edgemerge's runtime (no torch){needs}. Copy this folder and
../tasks.safetensors to the device, then:

    python client.py TASK {usage}

It prints one line per input: the predicted class, a tab, the input.
"""
import json
import os
import sys

import numpy as np

from edgemerge.errors import EdgemergeError
from edgemerge.runtime import open_bundle
from edgemerge.runtime.session import TaskSession

HERE = os.path.dirname(os.path.abspath(__file__))
{prepare}

def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    task, items = argv[0], argv[1:]
    with open(os.path.join(HERE, "classes.json"), encoding="utf-8") as f:
        classes = json.load(f)
    try:
        session = TaskSession(open_bundle(os.path.join(HERE, "..", "tasks.safetensors")), os.path.join(HERE, "{graph}"))
        inputs, labels = prepare(items)
        (logits,) = session.run(inputs, task=task)
    except EdgemergeError as exc:
        sys.exit(f"error: {{exc}}")
    for label, row in zip(labels, logits):
        print(f"{{classes[task][int(np.argmax(row))]}}\\t{{label}}")


if __name__ == "__main__":
    main(sys.argv[1:])
'''
PREPARE = {
    "text": (", and the `tokenizers` package", '"some text" ["more text" ...]', '''
from tokenizers import Tokenizer

TOKENIZER = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
TOKENIZER.enable_truncation({max_len})
TOKENIZER.no_padding()


def prepare(texts):
    """Token ids and attention mask, padded with 0 as in training."""
    enc = TOKENIZER.encode_batch(list(texts))
    width = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    return {{"input_ids": ids, "attention_mask": mask}}, texts
'''),
    "vision": ("", "images.npy   (uint8 grayscale, N x H x W, 8x8 or 28x28 as in training)", '''
SIZE = 32


def prepare(paths):
    """uint8 (N, H, W) grayscale -> float32 (N, 3, 32, 32) in [-1, 1], as in training."""
    images = np.load(paths[0], allow_pickle=False)
    n, h, w = images.shape
    if h < SIZE and SIZE % h == 0:  # 8x8: nearest-neighbour upscaling
        x = images.repeat(SIZE // h, axis=1).repeat(SIZE // w, axis=2)
    else:  # 28x28: centred on a zero canvas
        x = np.zeros((n, SIZE, SIZE), np.uint8)
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
        x[:, top:top + h, left:left + w] = images[:, :SIZE, :SIZE]
    x = (x.astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1)), [f"image {{i}}" for i in range(n)]
'''),
}


def write_deploy_folder(suite, out_dir: str, graph: str) -> list[str]:
    """What a device needs besides the bundle and the graph: class names, the tokenizer (text),
    and an example client. Returns the files written."""
    kind = suite.kind
    written = []
    with atomic_output(os.path.join(out_dir, "classes.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({t: list(c) for t, c in suite.classes.items()}, f, indent=1, ensure_ascii=False)
    written.append("classes.json")
    if kind.name == "text":
        from .suites.text_model import MAX_LEN, model_path

        shutil.copyfile(os.path.join(model_path(), "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
        written.append("tokenizer.json")
        needs, usage, prepare = PREPARE["text"]
        prepare = prepare.format(max_len=MAX_LEN)
    else:
        needs, usage, prepare = PREPARE["vision"]
        prepare = prepare.format()
    with atomic_output(os.path.join(out_dir, "client.py")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(CLIENT.format(needs=needs, usage=usage, prepare=prepare, graph=os.path.basename(graph)))
    written.append("client.py")
    return written


def deploy(bundle, suite, out_dir: str, torch_acc: dict[str, float]) -> dict[str, Any]:
    """Export once, switch through every task in ONNX Runtime, compare accuracy with torch."""
    from .export.onnx import export_onnx
    from .runtime.session import TaskSession

    kind = suite.kind
    exp = export_onnx(bundle, kind.onnx_factory, out_dir, input_names=kind.input_names, output_names=["logits"],
                      dynamic_axes=kind.dynamic_axes, name=kind.name)
    files = write_deploy_folder(suite, out_dir, exp.switchable)
    t0 = time.perf_counter()  # what loading one separate model costs: a session over a weights-in graph
    import onnxruntime

    onnxruntime.InferenceSession(exp.plain, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    session = TaskSession(bundle, exp.switchable)
    switch, device_acc = [], {}
    for t in bundle.tasks:
        switch.append(session.switch(t))
        data = suite.data[t]["test"]
        pred = predict(lambda *inputs: session.run(dict(zip(kind.input_names, inputs)))[0], data)
        device_acc[t] = float((pred == data.labels).mean())
    for t in bundle.tasks:  # a second pass: steady-state switch times
        switch.append(session.switch(t))
    n = len(bundle.tasks)
    return {
        "accuracy": device_acc,
        "matches_torch": {t: device_acc[t] == torch_acc[t] for t in bundle.tasks},
        "switch_ms_p50": float(np.median(switch[n:]) * 1e3),
        "switch_ms_max": float(np.max(switch[n:]) * 1e3),
        "onnx_bytes": os.path.getsize(exp.switchable),
        "per_task_onnx_bytes": os.path.getsize(exp.plain) * n,
        "bundle_bytes": os.path.getsize(bundle.path),
        "load_one_model_ms": load_s * 1e3,   # a new session from one model's ONNX file (page cache warm)
        "files": files,
    }


def headline(r: DemoResult) -> str:
    """One sentence for a deployer: what the bundle buys over one merged model and over N checkpoints."""
    mean = {m: 100 * np.mean([r.normalized(m, t) for t in r.tasks]) for m in [*MERGED, "tall"]}
    agree = {m: 100 * np.mean([r.agreement[m][t][0] for t in r.tasks]) for m in [*MERGED, "tall"]}
    best = max(MERGED, key=lambda m: mean[m])
    worst = min(r.tasks, key=lambda t: r.normalized("tall", t))
    s, mib = r.storage, 2**20
    text = (f"The TALL bundle keeps {mean['tall']:.1f}% of fine-tuned accuracy on average (worst task: {worst}, "
            f"{100 * r.normalized('tall', worst):.1f}%) and gives the fine-tuned model's answer on {agree['tall']:.1f}% of "
            f"test items, in {s['tall_bundle'] / mib:.1f} MiB, "
            f"{100 * s['tall_bundle'] / s['n_checkpoints']:.0f}% of the {len(r.tasks)} checkpoints' {s['n_checkpoints'] / mib:.1f} MiB; "
            f"the best single merged model ({LABELS[best]}) keeps {mean[best]:.1f}% (agreement {agree[best]:.1f}%) in "
            f"{s['one_merged_model'] / mib:.1f} MiB, "
            f"so the bundle {'gains' if mean['tall'] >= mean[best] else 'loses'} {abs(mean['tall'] - mean[best]):.1f} points "
            f"against it for {(s['tall_bundle'] - s['one_merged_model']) / mib:.1f} MiB more.")
    if r.deploy:
        d = r.deploy
        text += (f" On ONNX Runtime a task switch takes {d['switch_ms_p50']:.0f} ms, against {d['load_one_model_ms']:.0f} ms "
                 "to load one model's ONNX file.")
    return text


def write_report(r: DemoResult, out: str) -> None:
    with atomic_output(os.path.join(out, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(asdict(r), f, indent=2)
    methods = ["zero_shot", "finetuned", *MERGED, "tall"]
    from .suites.suite import get_kind

    suite = r.options.get("suite", "text")
    lines = [f"# edgemerge demo — {suite} suite ({get_kind(suite).label})", "", headline(r), "",
             f"Options: {json.dumps(r.options)}", "",
             "Test accuracy, absolute (normalized = method / fine-tuned). "
             f"Merge scale α chosen on validation from {list(ALPHAS)}: " + ", ".join(f"{LABELS[m]} {a}" for m, a in r.alpha.items()) + ".", "",
             "| task | classes | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for t in r.tasks:
        cells = [f"{100 * r.accuracy[m][t]:.1f}" + ("" if m in ("zero_shot", "finetuned") else f" ({100 * r.normalized(m, t):.1f}%)")
                 for m in methods]
        lines.append(f"| {t} | {r.classes[t]} | " + " | ".join(cells) + " |")
    avg = [f"{100 * np.mean([r.accuracy[m][t] for t in r.tasks]):.1f}" + ("" if m in ("zero_shot", "finetuned") else
           f" ({100 * np.mean([r.normalized(m, t) for t in r.tasks]):.1f}%)") for m in methods]
    lines += ["| **mean** | | " + " | ".join(avg) + " |", "",
              "Agreement with each task's fine-tuned model: the share of test items on which the method predicts the same "
              "class (± the binomial standard error over the test items).", "",
              "| task | test items | " + " | ".join(LABELS[m] for m in methods if m != "finetuned") + " |",
              "|---|---|" + "---|" * (len(methods) - 1)]
    for t in r.tasks:
        lines.append(f"| {t} | {r.test_items[t]} | " + " | ".join(
            f"{100 * r.agreement[m][t][0]:.1f} ± {100 * r.agreement[m][t][1]:.1f}" for m in methods if m != "finetuned") + " |")
    lines += ["| **mean** | | " + " | ".join(f"{100 * np.mean([r.agreement[m][t][0] for t in r.tasks]):.1f}"
                                             for m in methods if m != "finetuned") + " |", "",
              f"TALL λ_t (chosen on validation from {list(TALL_LAMBDAS)}) and mask density: " + ", ".join(
                  f"{t} λ={r.tall_lambda[t]} ({100 * r.tall_density[t]:.1f}%)" for t in r.tasks), "",
              "Pairwise cosine of task vectors (merged parameters):", "",
              "| | " + " | ".join(r.tasks) + " |", "|---|" + "---|" * len(r.tasks)]
    lines += [f"| {t} | " + " | ".join(f"{c:.3f}" for c in row) + " |" for t, row in zip(r.tasks, r.cosine)]
    s = r.storage
    lines += ["", f"Storage: {len(r.tasks)} fine-tuned checkpoints {s['n_checkpoints'] / 2**20:.1f} MiB; TALL bundle "
              f"{s['tall_bundle'] / 2**20:.1f} MiB ({100 * s['tall_bundle'] / s['n_checkpoints']:.1f}%); one merged model "
              f"{s['one_merged_model'] / 2**20:.1f} MiB."]
    if r.codecs:
        ft = r.accuracy["finetuned"]
        lines += ["", "Per-task codecs (bundle format v2, `edgemerge encode`): the same tasks, each rebuilt by its codec "
                  "(bits per parameter per task = bundle bytes beyond θ0 ÷ merged parameters ÷ tasks; "
                  "`bench/frontier_bench.py` measures more settings and the per-task selector).", "",
                  "| bundle | MiB | bits / param / task | normalized % (mean) | worst task % | agreement % |", "|---|---|---|---|---|---|"]
        for label, c in r.codecs.items():
            norm = [100 * c["accuracy"][t] / ft[t] for t in r.tasks if ft[t]]
            lines.append(f"| {label} | {c['bundle_bytes'] / 2**20:.1f} | {c['bits_per_param_task']:.3f} | {np.mean(norm):.1f} | "
                         f"{min(norm):.1f} | {100 * np.mean([c['agreement'][t][0] for t in r.tasks]):.1f} |")
    if r.deploy:
        d = r.deploy
        lines += ["", "Deploy (ONNX Runtime, switchable graph): accuracy equals torch on "
                  f"{sum(d['matches_torch'].values())}/{len(r.tasks)} tasks; switch p50 {d['switch_ms_p50']:.1f} ms; "
                  f"bundle + graph {(d['bundle_bytes'] + d['onnx_bytes']) / 2**20:.1f} MiB vs {len(r.tasks)} per-task ONNX files "
                  f"{d['per_task_onnx_bytes'] / 2**20:.1f} MiB."]
    lines += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
              + f" (fine-tuned this run: {', '.join(r.built) or 'none, all cached'}; {r.evaluations} accuracies computed,"
              " the rest from the cache)", "",
              "![accuracy per task](accuracy_per_task.png)", "", "![accuracy vs bytes](accuracy_vs_bytes.png)", "",
              "![storage, RAM and switch time](deploy.png)"]
    if r.deploy:
        lines += ["", f"Deploy folder `onnx/`: the switchable graph and {', '.join(r.deploy['files'])} — run "
                  "`python onnx/client.py TASK ...` next to `tasks.safetensors` on the device."]
    with atomic_output(os.path.join(out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plots(r, out, methods, get_kind(suite).label.split(",")[0])


def _plots(r: DemoResult, out: str, methods: list[str], model: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(methods)
    x = np.arange(len(r.tasks))
    for i, m in enumerate(methods):
        ax.bar(x + i * width, [100 * r.accuracy[m][t] for t in r.tasks], width, label=LABELS[m])
    ax.set_xticks(x + 0.4 - width / 2, r.tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy per task and method ({model})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_per_task.png"), dpi=110)
    plt.close(fig)
    s, n = r.storage, len(r.tasks)
    points = [("fine-tuned: N checkpoints", s["n_checkpoints"], "finetuned", "s")]
    points += [(LABELS[m] + ": one model", s["one_merged_model"], m, mk) for m, mk in zip(MERGED, "ov^D")]
    points += [("TALL bundle", s["tall_bundle"], "tall", "*"), ("zero-shot: θ0 + heads", s["one_merged_model"], "zero_shot", "x")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, nbytes, m, marker in points:  # one marker per method, named in the legend: no labels on top of each other
        ax.scatter(nbytes / 2**20, 100 * np.mean([r.normalized(m, t) for t in r.tasks]), s=70, marker=marker, label=label)
    ax.set_xlabel(f"bytes to store all {n} tasks (MiB)")
    ax.set_ylabel("mean normalized accuracy (%)")
    ax.set_title("Accuracy kept vs storage")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_bytes.png"), dpi=110)
    plt.close(fig)
    _deploy_plot(r, out, plt)


def _deploy_plot(r: DemoResult, out: str, plt) -> None:
    """Storage and RAM (N checkpoints vs the bundle vs one merged model) and, after a deploy, the
    switch time against loading one model."""
    s, n, mib = r.storage, len(r.tasks), 2**20
    panels = 2 if r.deploy else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    names = [f"{n} checkpoints", "TALL bundle", "one merged model"]
    storage = [s["n_checkpoints"], s["tall_bundle"], s["one_merged_model"]]
    # RAM to serve every task without reading storage again: N models resident; the bundle's data
    # plus the engine's one set of weights; one model
    ram = [s["n_checkpoints"], s["tall_bundle"] + s["one_merged_model"], s["one_merged_model"]]
    x = np.arange(3)
    ax.bar(x - 0.2, [v / mib for v in storage], 0.4, label="storage")
    ax.bar(x + 0.2, [v / mib for v in ram], 0.4, label="RAM to switch warm")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Bytes")
    ax.legend(fontsize=8)
    if r.deploy:
        ax = axes[0][1]
        d = r.deploy
        vals = [d["switch_ms_p50"], d["switch_ms_max"], d["load_one_model_ms"]]
        ax.bar(["switch p50", "switch max", "load one model"], vals, color=["tab:green", "tab:olive", "tab:red"])
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.0f} ms", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("ms (ONNX Runtime, this machine)")
        ax.set_title("Task switch vs loading a model")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "deploy.png"), dpi=110)
    plt.close(fig)
