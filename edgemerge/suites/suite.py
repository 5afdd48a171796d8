"""Build (or reuse) a suite's task checkpoints and evaluate weights on its splits.

Two suites, each a *kind* (``text_model.KIND``, ``vision_model.KIND``) that knows its data, its
model and how to train it; this module does what they share. Checkpoints live in
``$EDGEMERGE_CACHE`` (default ``~/.cache/edgemerge``) under
``suites/<kind version>/<seed, steps, lr, splits>/``: ``base.safetensors`` (θ0 without the head),
per task ``<task>.safetensors`` (fine-tuned model + head) and ``<task>.probe.safetensors`` (the
head fit on frozen θ0 features: the "zero-shot" model). Written atomically; reused when present.
Evaluations are cached by the sha256 of the exact weights evaluated, so a rerun with the same
checkpoints and options recomputes nothing it already measured.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, unknown_name
from ..io import atomic_output, write_safetensors

SUITES = ("text", "vision")
PROBE_ITEMS = 400
CALIB_ITEMS = 256  # training items whose inputs (no labels) calibrate repair=norm: neither val nor test


def get_kind(name: str) -> Any:
    """The suite kind object (imports its model code only when asked for)."""
    if name == "text":
        from .text_model import KIND
    elif name == "vision":
        from .vision_model import KIND
    else:
        raise ConfigError(unknown_name("suite", name, SUITES))
    return KIND


def split_indices(name: str, n: int, seed: int, test: int, val: int, train_cap: int) -> dict[str, np.ndarray]:
    """Disjoint train / val / test index sets from a permutation seeded by (seed, task, size);
    test ≤ 20% and val ≤ 15% of the items, train capped at ``train_cap``."""
    order = np.random.default_rng([seed, zlib.crc32(name.encode()), n]).permutation(n)
    n_test, n_val = min(test, n // 5), min(val, (n * 15) // 100)
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:][:train_cap]}


def cache_root() -> str:
    return os.environ.get("EDGEMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgemerge")


@dataclass
class Batches:
    """A split as model-ready batches: ``(inputs, index)`` pairs, ``inputs`` in the model's order."""

    batches: list[tuple[tuple[np.ndarray, ...], np.ndarray]]
    labels: np.ndarray


def predict(logits_fn: Callable[..., np.ndarray], data: Batches) -> np.ndarray:
    pred = np.empty(len(data.labels), dtype=np.int64)
    for inputs, idx in data.batches:
        pred[idx] = np.argmax(logits_fn(*inputs), axis=-1)
    return pred


def train_loop(torch, model, opt, n_items: int, steps: int, batch: int, seed: int,
               make_batch: Callable[[np.ndarray], list[tuple[tuple, Any]]],
               progress: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` minibatches of ``batch`` items drawn without replacement by a generator seeded
    with ``seed``; ``make_batch(indices)`` returns the minibatch as one or more micro-batches
    ``(model inputs, labels)`` whose gradients add up to the mean loss over the whole minibatch
    (micro-batches let text batches pad less). Leaves the model in eval mode."""
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        pick = rng.choice(n_items, size=min(batch, n_items), replace=False)
        opt.zero_grad()
        total = 0.0
        for inputs, labels in make_batch(pick):
            loss = torch.nn.functional.cross_entropy(model(*inputs), labels) * (len(labels) / len(pick))
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
        if progress:
            progress(step + 1)
    model.eval()
    return losses


def fit_head(torch, head, features, labels, epochs: int = 300) -> None:
    """Full-batch logistic regression of ``head`` on frozen features (the linear probe)."""
    x = features.clone()  # a normal tensor: inference-mode tensors cannot be saved for backward
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), labels).backward()
        opt.step()


@dataclass
class SuiteConfig:
    """``None`` fields take the kind's defaults (``resolved()``)."""

    suite: str = "text"
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    steps: int | None = None
    lr: float | None = None
    test: int | None = None
    val: int | None = None

    def resolved(self) -> "SuiteConfig":
        kind = get_kind(self.suite)
        d = kind.defaults
        for t in self.tasks or ():
            if t not in kind.loaders:
                raise ConfigError(unknown_name(f"{self.suite} task", t, list(kind.loaders)))
        return replace(self, tasks=tuple(self.tasks or kind.loaders), steps=self.steps or d["steps"], lr=self.lr or d["lr"],
                       test=self.test or d["test"], val=self.val or d["val"])

    @property
    def folder(self) -> str:
        # everything that changes a checkpoint is in the name (the splits decide the train set)
        c = self.resolved()
        key = f"seed{c.seed}-steps{c.steps}-lr{c.lr:g}-test{c.test}-val{c.val}-probe{PROBE_ITEMS}"
        return os.path.join(cache_root(), "suites", get_kind(c.suite).version, key)


@dataclass
class Suite:
    config: SuiteConfig
    kind: Any
    base: str
    checkpoints: dict[str, str]
    probes: dict[str, str]
    classes: dict[str, list[str]]
    data: dict[str, dict[str, Batches]]
    build_seconds: dict[str, float] = field(default_factory=dict)


def task_steps(kind: Any, task: str, steps: int) -> int:
    """Fine-tuning steps of ``task``: the suite's, times the kind's ``step_scale`` for tasks that
    measured short of their own weights at the suite's budget."""
    return steps * getattr(kind, "step_scale", {}).get(task, 1)


def build_suite(cfg: SuiteConfig, progress: Callable[[str, int, int], None] | None = None) -> Suite:
    """Fine-tune every missing task checkpoint (fixed seed and step budget); reuse the rest."""
    cfg = cfg.resolved()
    kind = get_kind(cfg.suite)
    os.makedirs(cfg.folder, exist_ok=True)
    base = os.path.join(cfg.folder, "base.safetensors")
    suite = Suite(cfg, kind, base, {}, {}, {}, {})
    if not os.path.exists(base):
        state = kind.build_classifier(2).state_dict()
        write_safetensors(base, {k: np.ascontiguousarray(v.numpy()) for k, v in state.items() if not fnmatch.fnmatchcase(k, kind.head)})
    for name in cfg.tasks:
        task = kind.loaders[name]()
        parts = kind.split(task, cfg.seed, cfg.test, cfg.val)
        suite.classes[name] = task.classes
        suite.data[name] = {k: kind.prepare(parts[k]) for k in ("val", "test")}
        suite.data[name]["calib"] = kind.prepare(kind.head_of(parts["train"], CALIB_ITEMS))  # inputs only (repair=norm)
        steps = task_steps(kind, name, cfg.steps)
        # a task trained longer than the suite's steps names its steps: no checkpoint of another recipe is reused
        stem = name if steps == cfg.steps else f"{name}.steps{steps}"
        ckpt, probe = os.path.join(cfg.folder, f"{stem}.safetensors"), os.path.join(cfg.folder, f"{name}.probe.safetensors")
        suite.checkpoints[name], suite.probes[name] = ckpt, probe
        if os.path.exists(ckpt) and os.path.exists(probe):
            continue
        t0 = time.perf_counter()
        model = kind.build_classifier(len(task.classes), seed=cfg.seed)  # the same head whatever else is built
        kind.linear_probe(model, kind.prepare(kind.head_of(parts["train"], PROBE_ITEMS)), cfg.seed)
        head = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if fnmatch.fnmatchcase(k, kind.head)}
        write_safetensors(probe, head)
        tick = (lambda s: progress(f"fine-tune {name}", s, steps)) if progress else None
        kind.finetune(model, parts["train"], steps, cfg.lr, cfg.seed, progress=tick)
        write_safetensors(ckpt, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        suite.build_seconds[name] = time.perf_counter() - t0
    return suite


def suite_repair(suite: Suite):
    """``repair=norm`` for the suite's tasks (``encode_bundle(repair=...)``): the suite's model,
    calibrated on the first CALIB_ITEMS training inputs of each task (their positions that count:
    the kind's ``positions``, None where every one does)."""
    from ..repair import norm_repair

    kind = suite.kind

    def build(task: str, weights):
        model = kind.build_classifier(len(suite.classes[task]))
        kind.load_weights(model, weights)
        return model

    return norm_repair(build, lambda task: [inputs for inputs, _ in suite.data[task]["calib"].batches], positions=kind.positions)


class Evaluator:
    """Predictions (and so accuracy) of a state dict on a task's split, cached by the sha256 of
    the weights; ``agreement`` compares two models' predictions item by item."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.path = os.path.join(suite.config.folder, "predictions.json")
        try:
            with open(self.path) as f:
                cache = json.load(f)
            self.cache: dict[str, str] = {k: v for k, v in cache.items() if isinstance(v, str)}
        except (OSError, ValueError, AttributeError):  # missing, damaged or foreign: recompute
            self.cache = {}
        self._models: dict[int, object] = {}
        self.computed = 0

    @staticmethod
    def digest(weights: dict[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for k in sorted(weights):
            a = np.ascontiguousarray(weights[k])
            h.update(f"{k}\t{a.dtype}\t{a.shape}\n".encode())
            h.update(memoryview(a.reshape(-1).view(np.uint8)))
        return h.hexdigest()

    def predictions(self, task: str, split: str, weights: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted class per item of the split (int64), in the split's order."""
        data = self.suite.data[task][split]
        key = f"{task}/{split}/{self.digest(weights)}"
        pred = None
        if key in self.cache:
            try:
                pred = np.frombuffer(base64.b64decode(self.cache[key], validate=True), dtype=np.uint8).astype(np.int64)
            except ValueError:
                pred = None
            if pred is not None and len(pred) != len(data.labels):
                pred = None  # a different split under the same name: recompute
        if pred is None:
            kind, n_cls = self.suite.kind, len(self.suite.classes[task])
            if n_cls > 256:
                raise ConfigError(f"task {task!r} has {n_cls} classes; the prediction cache holds at most 256")
            model = self._models.get(n_cls) or self._models.setdefault(n_cls, kind.build_classifier(n_cls))
            kind.load_weights(model, weights)
            pred = predict(kind.torch_logits(model), data)
            self.cache[key] = base64.b64encode(pred.astype(np.uint8).tobytes()).decode()
            self.computed += 1
        return pred

    def accuracy(self, task: str, split: str, weights: dict[str, np.ndarray]) -> float:
        return float((self.predictions(task, split, weights) == self.suite.data[task][split].labels).mean())

    def save(self) -> None:
        with atomic_output(self.path) as tmp, open(tmp, "w") as f:
            json.dump(self.cache, f)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Fraction of items on which two models predict the same class, and its standard error
    (binomial, √(p(1−p)/n)): the ± of one task-seed's figure."""
    p = float((np.asarray(a) == np.asarray(b)).mean())
    return p, float(np.sqrt(p * (1 - p) / len(a)))
