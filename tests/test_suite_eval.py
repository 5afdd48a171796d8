"""The suites' evaluator: predictions cached by the exact weights, accuracy and agreement from them."""

import json
import types

import numpy as np
import pytest

from edgemerge.errors import ConfigError
from edgemerge.suites.suite import Batches, Evaluator, agreement


class LinearKind:
    """A numpy "model": logits = x @ W; counts how often it really runs."""

    def __init__(self):
        self.runs = 0

    def build_classifier(self, n_classes):
        return {}

    def load_weights(self, model, weights):
        model["W"] = weights["W"]

    def torch_logits(self, model):
        def run(x):
            self.runs += 1
            return x @ model["W"]
        return run


def _suite(tmp_path, n_classes=3):
    x = np.eye(4, dtype=np.float32)
    labels = np.array([0, 1, 2, 0])
    data = {"a": {"test": Batches([((x[:3],), np.arange(3)), ((x[3:],), np.arange(3, 4))], labels)}}
    cfg = types.SimpleNamespace(folder=str(tmp_path))
    return types.SimpleNamespace(config=cfg, kind=LinearKind(), data=data, classes={"a": list("abcdefgh"[:n_classes])})


W = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32)  # item 3 -> class 2 (label 0)


def test_predictions_accuracy_and_the_cache(tmp_path):
    suite = _suite(tmp_path)
    ev = Evaluator(suite)
    assert ev.predictions("a", "test", {"W": W}).tolist() == [0, 1, 2, 2]
    assert ev.accuracy("a", "test", {"W": W}) == 0.75
    assert suite.kind.runs == 2 and ev.computed == 1  # two batches, once: the second call came from the cache
    ev.save()
    again = Evaluator(suite)
    assert again.accuracy("a", "test", {"W": W}) == 0.75 and suite.kind.runs == 2 and again.computed == 0
    other = W.copy()
    other[3] = [1, 0, 0]
    assert again.accuracy("a", "test", {"W": other}) == 1.0 and again.computed == 1  # other bytes, other key


def test_a_damaged_or_foreign_cache_is_recomputed(tmp_path):
    suite = _suite(tmp_path)
    ev = Evaluator(suite)
    key = f"a/test/{ev.digest({'W': W})}"
    for cache in ({key: "!!not base64"}, {key: "AAAA"}, {key: 0.5}, [1, 2]):  # bad text, 3 items for 4, old floats, not a dict
        (tmp_path / "predictions.json").write_text(json.dumps(cache))
        ev = Evaluator(suite)
        assert ev.predictions("a", "test", {"W": W}).tolist() == [0, 1, 2, 2] and ev.computed == 1
    (tmp_path / "predictions.json").write_text("{truncated")
    assert Evaluator(suite).accuracy("a", "test", {"W": W}) == 0.75


def test_more_classes_than_the_cache_holds(tmp_path):
    with pytest.raises(ConfigError, match="task 'a' has 300 classes"):
        suite = _suite(tmp_path)
        suite.classes["a"] = [str(i) for i in range(300)]
        Evaluator(suite).predictions("a", "test", {"W": W})


def test_agreement_and_its_standard_error():
    assert agreement(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 0])) == (0.75, float(np.sqrt(0.75 * 0.25 / 4)))
    assert agreement(np.array([3, 3]), np.array([3, 3])) == (1.0, 0.0)


def test_a_cached_merge_is_reused_only_with_the_same_lambda_grid(tmp_path):
    from conftest import make_suite

    from edgemerge.demo import _reusable
    from edgemerge.pipeline import MergeConfig, merge

    base, tasks = make_suite(tmp_path)
    cfg = MergeConfig(base, tasks, "task_arithmetic", masks="tall", private=("head.*",), lambdas=(0.2, 0.4))
    merge(cfg, tmp_path / "m.safetensors")
    assert _reusable(str(tmp_path / "m.safetensors"), cfg)
    wider = MergeConfig(base, tasks, "task_arithmetic", masks="tall", private=("head.*",), lambdas=(0.2, 0.4, 3.0))
    assert not _reusable(str(tmp_path / "m.safetensors"), wider)
    assert not _reusable(str(tmp_path / "nothing.safetensors"), cfg)
