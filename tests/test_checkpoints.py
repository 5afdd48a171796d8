"""Checkpoint inputs: torch pickles (weights_only), sharded folders, bf16, and refusal of code."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from edgemerge.checkpoints import open_checkpoint
from edgemerge.errors import CheckpointError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle

from conftest import make_suite


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/edgemerge-pwned')}",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to unpickle: .*weights_only=True"):
        open_checkpoint(path)
    assert not marker.exists()


def test_torch_checkpoints_merge_like_safetensors(tmp_path):
    base, tasks = make_suite(tmp_path, n_tasks=2)
    pt_tasks = {}
    for name, p in tasks.items():
        sd = {k: torch.from_numpy(v) for k, v in load_file(p).items()}
        torch.save({"state_dict": sd}, tmp_path / f"{name}.pt")  # Lightning-style wrapper
        pt_tasks[name] = str(tmp_path / f"{name}.pt")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(base).items()}, tmp_path / "base.bin")
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "a.safetensors")
    merge(MergeConfig(str(tmp_path / "base.bin"), pt_tasks, private=("head.*",)), tmp_path / "b.safetensors")
    a, b = open_bundle(tmp_path / "a.safetensors"), open_bundle(tmp_path / "b.safetensors")
    assert a.checksums == b.checksums


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_files_are_read_with_positional_reads(tmp_path, zipped):
    """A zip-format file keeps no tensor in memory (reads go to the file, like safetensors); a
    legacy pickle cannot be mapped and is kept as loaded. Both read the same values."""
    from edgemerge.checkpoints import TorchCheckpoint

    rng = np.random.default_rng(5)
    big = torch.from_numpy(rng.standard_normal((64, 33)).astype(np.float32))
    sd = {"a": big, "a_t": big.t(), "row": big[3], "h": torch.arange(10, dtype=torch.int64),
          "bf": torch.randn(7, 5).to(torch.bfloat16), "z": torch.zeros(0, 4), "s": torch.tensor(2.5)}
    path = tmp_path / "m.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zipped)
    c = TorchCheckpoint(str(path))
    if zipped:  # the transposed view is the only tensor that is not contiguous; empty ones need no read
        assert sorted(c._arrays) == ["a_t", "z"] and sorted(c._offsets) == ["a", "bf", "h", "row", "s"]
    else:
        assert c._offsets == {} and len(c._arrays) == len(sd)
    for k, t in sd.items():
        want = t.contiguous().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()
        got = c.read(k)
        assert got.shape == tuple(t.shape) and got.tobytes() == want.tobytes(), k
        if t.numel() > 9:
            assert c.read(k, 3, 9).tobytes() == want.reshape(-1)[3:9].tobytes(), k
    c.close()


def test_sharded_folder(tmp_path):
    base, tasks = make_suite(tmp_path, n_tasks=2)
    sd = load_file(tasks["task0"])
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(shard_dir / name))
        weight_map.update({k: name for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = open_checkpoint(shard_dir)
    assert sorted(ck.keys()) == keys
    assert all(np.array_equal(ck.read(k), sd[k]) for k in keys)
    assert np.array_equal(ck.read("enc.0.weight", 5, 9), sd["enc.0.weight"].reshape(-1)[5:9])
    merge(MergeConfig(base, {"task0": str(shard_dir), "task1": tasks["task1"]}, private=("head.*",)), tmp_path / "b.safetensors")


def test_shard_index_must_not_escape_the_folder(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../other.safetensors"}}))
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        open_checkpoint(d)


def test_bf16_checkpoints(tmp_path):
    base = {"w": torch.randn(16, 8, dtype=torch.bfloat16)}
    torch.save(base, tmp_path / "base.pt")
    tasks = {}
    for t in range(2):
        torch.save({"w": base["w"] + 0.05 * torch.randn(16, 8, dtype=torch.bfloat16)}, tmp_path / f"t{t}.pt")
        tasks[f"t{t}"] = str(tmp_path / f"t{t}.pt")
    merge(MergeConfig(str(tmp_path / "base.pt"), tasks, "task_arithmetic", vector_dtype="BF16"), tmp_path / "b.safetensors")
    b = open_bundle(tmp_path / "b.safetensors")
    assert b.param("w").dtype == "BF16" and b.vector_dtype == "BF16"
    w = b.task_weights("t0")["w"]
    assert str(w.dtype) == "bfloat16"
    b0 = base["w"].float()
    exp = torch.where(torch.from_numpy(b.mask("t0", "w")), b0 + torch.from_numpy(b.vector("w").astype(np.float32)), b0).bfloat16()
    assert np.array_equal(w.view(np.uint16), exp.view(torch.int16).numpy().view(np.uint16))


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        open_checkpoint(tmp_path / "x.onnx")
