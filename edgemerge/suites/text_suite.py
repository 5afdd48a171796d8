"""Build (or reuse) the text suite's task checkpoints and evaluate weights on its splits.

Checkpoints live in ``$EDGEMERGE_CACHE`` (default ``~/.cache/edgemerge``) under
``suites/<SUITE_VERSION>/<seed, steps, lr, splits>/``: ``base.safetensors`` (θ0: the encoder), per task
``<task>.safetensors`` (fine-tuned encoder + head) and ``<task>.probe.safetensors`` (the head
fit on frozen θ0 features: the "zero-shot" model). Written atomically; reused when present.
Evaluations are cached by the sha256 of the exact weights evaluated, so a rerun with the same
checkpoints and options recomputes nothing it already measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..io import atomic_output, write_safetensors
from . import text_data, text_model

SUITE_VERSION = "text-v2"  # bump whenever data, splits or training change
PROBE_ITEMS = 400


def cache_root() -> str:
    return os.environ.get("EDGEMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgemerge")


@dataclass
class SuiteConfig:
    tasks: tuple[str, ...] = tuple(text_data.LOADERS)
    seed: int = 0
    steps: int = 60
    lr: float = 1e-4
    test: int = 250
    val: int = 100

    @property
    def folder(self) -> str:
        # everything that changes a checkpoint is in the name (the splits decide the train set)
        key = f"seed{self.seed}-steps{self.steps}-lr{self.lr:g}-test{self.test}-val{self.val}-probe{PROBE_ITEMS}"
        return os.path.join(cache_root(), "suites", SUITE_VERSION, key)


@dataclass
class Suite:
    config: SuiteConfig
    base: str
    checkpoints: dict[str, str]
    probes: dict[str, str]
    classes: dict[str, list[str]]
    data: dict[str, dict[str, text_model.Batches]]
    build_seconds: dict[str, float] = field(default_factory=dict)


def _load_np(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def build_suite(cfg: SuiteConfig, progress: Callable[[str, int, int], None] | None = None) -> Suite:
    """Fine-tune every missing task checkpoint (fixed seed and step budget); reuse the rest."""
    for t in cfg.tasks:
        if t not in text_data.LOADERS:
            from ..errors import ConfigError, unknown_name

            raise ConfigError(unknown_name("text task", t, list(text_data.LOADERS)))
    os.makedirs(cfg.folder, exist_ok=True)
    base = os.path.join(cfg.folder, "base.safetensors")
    suite = Suite(cfg, base, {}, {}, {}, {})
    if not os.path.exists(base):
        enc = text_model.build_classifier(2).encoder
        write_safetensors(base, {f"encoder.{k}": v.numpy() for k, v in enc.state_dict().items()})
    for name in cfg.tasks:
        task = text_data.LOADERS[name]()
        parts = text_data.split(task, cfg.seed, cfg.test, cfg.val)
        suite.classes[name] = task.classes
        suite.data[name] = {k: text_model.tokenize(parts[k].texts, parts[k].labels) for k in ("val", "test")}
        ckpt, probe = os.path.join(cfg.folder, f"{name}.safetensors"), os.path.join(cfg.folder, f"{name}.probe.safetensors")
        suite.checkpoints[name], suite.probes[name] = ckpt, probe
        if os.path.exists(ckpt) and os.path.exists(probe):
            continue
        t0 = time.perf_counter()
        model = text_model.build_classifier(len(task.classes))
        lp = text_model.tokenize(parts["train"].texts[:PROBE_ITEMS], parts["train"].labels[:PROBE_ITEMS])
        text_model.linear_probe(model, lp, cfg.seed)
        write_safetensors(probe, {f"head.{k}": v.detach().numpy().copy() for k, v in model.head.state_dict().items()})
        tick = (lambda s: progress(f"fine-tune {name}", s, cfg.steps)) if progress else None
        text_model.finetune(model, parts["train"].texts, parts["train"].labels, cfg.steps, cfg.lr, cfg.seed, progress=tick)
        write_safetensors(ckpt, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        suite.build_seconds[name] = time.perf_counter() - t0
    return suite


class Evaluator:
    """Accuracy of a state dict on a task's split, cached by the sha256 of the weights."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.path = os.path.join(suite.config.folder, "evals.json")
        try:
            with open(self.path) as f:
                self.cache: dict[str, float] = json.load(f)
        except (OSError, ValueError):
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

    def accuracy(self, task: str, split: str, weights: dict[str, np.ndarray]) -> float:
        key = f"{task}/{split}/{self.digest(weights)}"
        if key not in self.cache:
            n_cls = len(self.suite.classes[task])
            model = self._models.get(n_cls) or self._models.setdefault(n_cls, text_model.build_classifier(n_cls))
            text_model.load_weights(model, weights)
            data = self.suite.data[task][split]
            pred = text_model.predict(text_model.torch_logits(model), data)
            self.cache[key] = float((pred == data.labels).mean())
            self.computed += 1
        return self.cache[key]

    def save(self) -> None:
        with atomic_output(self.path) as tmp, open(tmp, "w") as f:
            json.dump(self.cache, f)
