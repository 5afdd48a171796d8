"""Nothing lost (issue 13, items 1-2): an output is replaced only by a file the reader accepts, and
no writer replaces one of its own inputs, whatever path or link names it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import edgemerge.io
from edgemerge.bundle import write_bundle
from edgemerge.errors import CheckpointError, ConfigError, FormatError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle

PREVIOUS = b"the previous bundle, which must survive"


def _left(tmp_path):
    """Names in the folder other than inputs and the output: temp files or scratch folders."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(PREVIOUS)
    return path


def test_a_tensor_name_the_reader_refuses_never_replaces_the_output(tmp_path, out):
    rng = np.random.default_rng(0)
    sd = {"w": torch.from_numpy(rng.standard_normal(8).astype(np.float32)), "bad\nname": torch.zeros(3)}
    torch.save(sd, tmp_path / "base.pt")
    torch.save({k: v + 1 for k, v in sd.items()}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"base.pt: tensor name 'bad\\nname' is empty, has control characters"):
        merge(MergeConfig(str(tmp_path / "base.pt"), {"t": str(tmp_path / "t.pt")}, "task_arithmetic"), out)
    assert out.read_bytes() == PREVIOUS and _left(tmp_path) == []
    # and the writer itself, for callers of write_safetensors: refused before a byte is written
    with pytest.raises(FormatError, match=r"without control characters: 'bad\\nname'; nothing was written"):
        edgemerge.io.write_safetensors(out, {"bad\nname": np.zeros(2, np.float32)})
    assert out.read_bytes() == PREVIOUS and _left(tmp_path) == []


def test_a_task_name_with_a_trailing_newline_is_refused_up_front(suite, out):
    base, tasks = suite
    with pytest.raises(FormatError, match="task name 'a\\\\n' is not allowed"):
        merge(MergeConfig(base, {"a\n": tasks["task0"]}, private=("head.*",)), out)
    assert out.read_bytes() == PREVIOUS


def test_a_header_over_the_readers_cap_is_refused_before_writing(suite, out, monkeypatch):
    base, tasks = suite
    monkeypatch.setattr(edgemerge.io, "MAX_HEADER_BYTES", 2000)  # stands in for a 100,000-tensor merge
    with pytest.raises(FormatError, match=r"over the 2,000-byte cap .*nothing was written"):
        merge(MergeConfig(base, tasks, private=("head.*",)), out)
    assert out.read_bytes() == PREVIOUS and _left(out.parent) == []


def test_the_readers_check_runs_before_the_rename(tmp_path, out, monkeypatch):
    import edgemerge.bundle as writer

    def refuse(path, verify=False):
        raise FormatError(f"{path}: refused for the test")

    monkeypatch.setattr(writer, "open_bundle", refuse)
    with pytest.raises(FormatError, match=f"{out}: refused for the test -- the bundle reader would refuse it"):
        write_bundle(out, tasks={"a": {}}, base={"w": np.ones(2, np.float32)}, vector={})
    assert out.read_bytes() == PREVIOUS and _left(tmp_path) == []


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "relative path"])
def test_merge_refuses_to_write_over_its_inputs(suite, tmp_path, how, monkeypatch):
    base, tasks = suite
    before = {p: open(p, "rb").read() for p in [base, *tasks.values()]}
    for victim in (base, tasks["task1"]):
        target = victim
        if how == "symlink":
            target = str(tmp_path / "link.safetensors")
            os.symlink(victim, target)
        elif how == "hard link":
            target = str(tmp_path / "hard.safetensors")
            os.link(victim, target)
        elif how == "relative path":
            monkeypatch.chdir(tmp_path)
            target = os.path.relpath(victim)
        with pytest.raises(ConfigError, match=f"refusing to write .*: it is the input {victim}"):
            merge(MergeConfig(base, tasks, private=("head.*",)), target)
        for p in (target,) if how in ("symlink", "hard link") else ():
            os.unlink(p)
    assert {p: open(p, "rb").read() for p in before} == before


def test_merge_refuses_a_file_inside_a_sharded_input(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "base").mkdir()
    save_file({"w": rng.standard_normal(4).astype(np.float32)}, str(tmp_path / "base" / "model.safetensors"))
    save_file({"w": rng.standard_normal(4).astype(np.float32)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ConfigError, match="it is the input"):
        merge(MergeConfig(str(tmp_path / "base"), {"t": str(tmp_path / "t.safetensors")}, "task_arithmetic"),
              tmp_path / "base" / "model.safetensors")


def test_extract_and_export_flat_refuse_to_write_over_the_bundle(suite, tmp_path):
    from edgemerge.export.flat import write_flat

    base, tasks = suite
    bundle = tmp_path / "b.safetensors"
    merge(MergeConfig(base, tasks, private=("head.*",)), bundle)
    before = bundle.read_bytes()
    with pytest.raises(ConfigError, match="it is the bundle"):
        write_flat(str(bundle), str(bundle))
    for args in (["extract", bundle, "--task", "task0", "-o", bundle], ["export", "flat", bundle, "-o", bundle]):
        p = subprocess.run([sys.executable, "-m", "edgemerge.cli", *map(str, args)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "refusing to write" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert bundle.read_bytes() == before
    open_bundle(bundle, verify=True)



@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_the_umask_gives(suite, tmp_path, umask):
    base, tasks = suite
    old = os.umask(umask)
    try:
        merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(suite, tmp_path):
    base, tasks = suite
    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f".edgemerge-{dead}-abc", tmp_path / f".b.safetensors.{dead}.xyz.tmp"]
    kept = [tmp_path / f".edgemerge-{live}-abc", tmp_path / f".b.safetensors.{live}.xyz.tmp"]
    for p in (stale[0], kept[0]):
        p.mkdir()
        (p / "vector.f32").write_bytes(b"scratch")
    for p in (stale[1], kept[1]):
        p.write_bytes(b"partial")
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_symlinked_output_is_replaced_not_written_through(suite, tmp_path):
    base, tasks = suite
    victim = tmp_path / "elsewhere.bin"
    victim.write_bytes(PREVIOUS)
    (tmp_path / "b.safetensors").symlink_to(victim)
    merge(MergeConfig(base, tasks, private=("head.*",)), tmp_path / "b.safetensors")
    assert victim.read_bytes() == PREVIOUS and not (tmp_path / "b.safetensors").is_symlink()
    open_bundle(tmp_path / "b.safetensors")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_unsupported_dtypes_are_named_with_their_file(tmp_path, dtype):
    torch.save({"w": torch.zeros(4).to(dtype)}, tmp_path / "base.pt")
    torch.save({"w": torch.ones(4).to(dtype)}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"base.pt: tensor\(s\) of a dtype edgemerge does not handle: 'w' \((complex64|float8_e4m3fn)\)"):
        merge(MergeConfig(str(tmp_path / "base.pt"), {"t": str(tmp_path / "t.pt")}, "task_arithmetic"), tmp_path / "b.safetensors")


def test_names_that_are_not_utf8_are_named_with_their_file(tmp_path):
    torch.save({"w\udc80": torch.zeros(4)}, tmp_path / "base.pt")
    torch.save({"w\udc80": torch.ones(4)}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"base.pt: tensor name 'w\\udc80' is empty, has control characters or is not valid UTF-8"):
        merge(MergeConfig(str(tmp_path / "base.pt"), {"t": str(tmp_path / "t.pt")}, "task_arithmetic"), tmp_path / "b.safetensors")


@pytest.mark.parametrize("index, message", [
    ({"weight_map": {"w": "a\0.safetensors"}}, "must be a plain file name"),
    ("DEEP", "not valid JSON"),
])
def test_shard_indexes_are_checked(tmp_path, index, message):
    import json

    from edgemerge.checkpoints import open_checkpoint
    from edgemerge.errors import CheckpointError as CE

    (tmp_path / "m").mkdir()
    text = "[" * 100_000 + "]" * 100_000 if index == "DEEP" else json.dumps(index)
    (tmp_path / "m" / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CE, match=message):
        open_checkpoint(tmp_path / "m")


def test_run_with_a_missing_input_file_is_one_line(tmp_path):
    from edgemerge.cli import _load_inputs

    with pytest.raises(ConfigError, match=r"--input .*nosuch.npy: No such file or directory; give a .npy file"):
        _load_inputs((str(tmp_path / "nosuch.npy"),))
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="not a plain .npy array"):
        _load_inputs((str(tmp_path / "x.npy"),))
