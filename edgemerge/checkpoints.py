"""Reading task checkpoints: safetensors files, sharded safetensors folders, torch state dicts.

Every source exposes the same small interface (``keys``, ``info``, ``read``) and reads one tensor
-- or one slice of it -- at a time, so a merge never holds a whole model. Torch pickles are loaded
with ``weights_only=True`` only: a checkpoint whose pickle would build arbitrary objects is refused.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from .errors import CheckpointError, ConfigError, FormatError
from .runtime.dtypes import DTYPES, FLOAT_DTYPES, dtype_name
from .runtime.safetensors import bad_name, parse_json, read_header

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A read-only tensor source. Subclasses fill ``_info`` and implement ``_read``."""

    path: str
    _info: dict[str, TensorInfo]
    aliases: dict[str, str] = {}    # tied names (alias -> canonical key), not in keys(): read once

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat elements ``[start, stop)`` of tensor ``key`` (the whole tensor, reshaped, by default)."""
        info = self._info[key]
        whole = start == 0 and stop is None
        stop = info.numel if stop is None else stop
        arr = self._read(key, start, stop)
        return arr.reshape(info.shape) if whole else arr

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def sha256(self) -> str:
        return file_sha256(self.path)

    def close(self) -> None:
        pass


def file_sha256(path: str, chunk: int = 8 << 20) -> str:
    """sha256 of a file, or for a folder of the sorted 'name<TAB>sha256' lines of its files."""
    if os.path.isdir(path):
        h = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                h.update(f"{name}\t{file_sha256(full)}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pread_elements(f, path: str, key: str, dt: np.dtype, data_offset: int, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a tensor whose bytes start at ``data_offset`` in the open file
    ``f``: positional reads into a fresh array (page cache, not this process's RSS)."""
    out = np.empty(stop - start, dtype=dt)
    view = memoryview(out.view(np.uint8))
    done, offset = 0, data_offset + start * dt.itemsize
    while done < out.nbytes:
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got <= 0:
            raise FormatError(f"{path}: tensor {key!r} truncated while reading")
        done += got
    return out


class SafetensorsCheckpoint(Checkpoint):
    """One .safetensors file; tensors are read with positional reads (page cache, not RSS)."""

    def __init__(self, path: str):
        self.path = path
        self.header = read_header(path)
        self._info = {n: TensorInfo(e.dtype, e.shape) for n, e in self.header.tensors.items()}
        self._f = open(path, "rb")

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        e = self.header.tensors[key]
        return pread_elements(self._f, self.path, key, DTYPES[e.dtype], self.header.data_start + e.start, start, stop)

    def close(self) -> None:
        self._f.close()


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face style folder: ``*.safetensors.index.json`` with a ``weight_map``."""

    def __init__(self, index_path: str):
        self.path = os.path.dirname(index_path) or "."
        try:
            with open(index_path, "rb") as f:
                weight_map = parse_json(f.read(), index_path)["weight_map"]
        except (OSError, FormatError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a readable safetensors index with a 'weight_map' ({exc})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard files")
        self._shards: dict[str, SafetensorsCheckpoint] = {}
        self._where: dict[str, SafetensorsCheckpoint] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or bad_name(shard):
                raise CheckpointError(f"{index_path}: shard name {shard!r} for {key!r} must be a plain file name")
            if shard not in self._shards:
                self._shards[shard] = SafetensorsCheckpoint(os.path.join(self.path, shard))
            if key not in self._shards[shard].header.tensors:
                raise CheckpointError(f"{index_path}: {key!r} is mapped to {shard} but that shard lacks it")
            self._where[key] = self._shards[shard]
        self._info = {k: s.info(k) for k, s in self._where.items()}

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._where[key]._read(key, start, stop)

    def close(self) -> None:
        for s in self._shards.values():
            s.close()


class TorchCheckpoint(Checkpoint):
    """A torch state dict, loaded with ``weights_only=True``.

    A zip-format file (torch.save since 1.6, Hugging Face ``pytorch_model.bin``) is loaded
    memory-mapped only to learn where each tensor's bytes lie in the file; the tensors are then
    dropped and read like safetensors, with positional reads, so a merge from ``.pt``/``.bin``
    holds no more than one from safetensors. Legacy pickles, big-endian files and non-contiguous
    views are kept in memory as loaded.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading torch checkpoints needs torch: pip install 'edgemerge[torch]'") from None
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            if type(exc).__name__ == "UnpicklingError":
                raise CheckpointError(
                    f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
                    "(weights_only=True). If you trust it, convert it to safetensors yourself."
                ) from None
            raise CheckpointError(f"{path}: cannot read torch checkpoint ({exc})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning-style wrapper
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
        from .runtime.torch_backend import tied_names

        unknown = sorted(f"{k!r} ({str(v.dtype).replace('torch.', '')})" for k, v in obj.items() if v.dtype not in _torch_ok())
        if unknown:
            raise CheckpointError(f"{path}: tensor(s) of a dtype edgemerge does not handle: {', '.join(unknown[:5])}; "
                                  f"supported: {', '.join(DTYPES)}. Convert or drop them first")
        self.aliases = tied_names(obj)
        state = {str(k): v for k, v in obj.items() if str(k) not in self.aliases}
        self._offsets = file_offsets(path, state)       # key -> where its bytes start in the file
        self._arrays = {k: _torch_to_numpy(v) for k, v in state.items() if k not in self._offsets}
        self._info = {k: TensorInfo(_torch_dtype_name(v), tuple(v.shape)) for k, v in state.items()}
        self._f = open(path, "rb") if self._offsets else None
        del obj, state  # the mapping goes with the tensors: nothing of the file stays resident

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        if key in self._offsets:
            return pread_elements(self._f, self.path, key, DTYPES[self._info[key].dtype], self._offsets[key], start, stop)
        return self._arrays[key].reshape(-1)[start:stop]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


@functools.lru_cache(maxsize=1)
def _torch_ok() -> frozenset:
    """The torch dtypes that have a safetensors name here (complex and float8 do not)."""
    import torch

    return frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                      torch.int8, torch.uint8, torch.bool} | {getattr(torch, n) for n in ("uint16", "uint32", "uint64")
                                                              if hasattr(torch, n)})


def _torch_dtype_name(t) -> str:
    import torch

    return "BF16" if t.dtype == torch.bfloat16 else dtype_name(t.numpy().dtype)


def file_offsets(path: str, state: Mapping) -> dict[str, int]:
    """Byte offset in a torch zip file of each contiguous tensor of a memory-mapped ``state``.

    A memory-mapped load maps the whole file once and points each storage at its record, so
    ``storage pointer - mapping base`` is the record's offset. The base is the one candidate that
    puts every storage on a record and whose file bytes equal each tensor's first and last bytes.
    Anything else (not a zip file, big-endian, a layout this does not recognize): {} -- the caller
    keeps the tensors in memory, as loaded.
    """
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)
        records = reader.get_all_records()
        if reader.has_record("byteorder") and bytes(reader.get_record("byteorder")).strip() != b"little":
            return {}
        starts = sorted(reader.get_record_offset(r) for r in records if r.startswith("data/"))
    except Exception:  # legacy pickle files, or a torch without this reader
        return {}
    tensors = {k: t for k, t in state.items() if t.numel() and t.is_contiguous() and t.device.type == "cpu"}
    if not tensors or not starts:
        return {}
    ptrs = {k: t.untyped_storage().data_ptr() for k, t in tensors.items()}
    lowest, valid = min(ptrs.values()), set(starts)
    with open(path, "rb") as f:
        for first in starts:
            base = lowest - first
            if not all(p - base in valid for p in ptrs.values()):
                continue
            offsets = {k: ptrs[k] - base + t.storage_offset() * t.element_size() for k, t in tensors.items()}
            if all(_same_ends(f, offsets[k], t) for k, t in tensors.items()):
                return offsets
    return {}


def _same_ends(f, offset: int, t) -> bool:
    """The file's bytes at ``offset`` start and end like the tensor's (up to 4 KiB each)."""
    raw = _torch_to_numpy(t).reshape(-1).view(np.uint8)
    n = min(raw.size, 4096)
    return os.pread(f.fileno(), n, offset) == raw[:n].tobytes() and \
        os.pread(f.fileno(), n, offset + raw.size - n) == raw[raw.size - n:].tobytes()


def _torch_to_numpy(t) -> np.ndarray:
    from .runtime.torch_backend import numpy_view

    return numpy_view(t.detach().cpu().contiguous())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint by what it is: .safetensors, a sharded folder/index, or a torch pickle."""
    path = os.fspath(path)
    if os.path.isdir(path):
        index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if index:
            return ShardedCheckpoint(os.path.join(path, index[0]))
        single = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(single) == 1:
            return SafetensorsCheckpoint(os.path.join(path, single[0]))
        raise CheckpointError(f"{path}: folder has no *.safetensors.index.json and not exactly one .safetensors file")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors.index.json"):
        return ShardedCheckpoint(path)
    if path.endswith(".safetensors"):
        return SafetensorsCheckpoint(path)
    if path.endswith(TORCH_SUFFIXES):
        return TorchCheckpoint(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; use .safetensors, a sharded folder, or {', '.join(TORCH_SUFFIXES)}")


# -- validation ---------------------------------------------------------------------------------


# Running statistics are not task vectors (summing N tasks' variance changes can make a variance
# negative): by default each task keeps its own, stored whole like a head. Names follow torch's
# BatchNorm/InstanceNorm buffers and Keras' moving averages.
STATISTICS = ("*running_mean", "*running_var", "*num_batches_tracked", "*moving_mean", "*moving_variance")
VARIANCES = ("*running_var", "*moving_variance")
STAT_POLICIES = ("per-task", "merge")


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@dataclass
class Plan:
    """What the merge will do with every key, decided from the headers alone."""

    merged: list[str]                       # float params of θ0: τ, masks
    carried: list[str]                      # integer/bool buffers: copied from θ0, never merged
                                            # (the merge adds float params that no task changed)
    private: dict[str, list[str]] = field(default_factory=dict)  # task -> keys stored whole
    statistics: list[str] = field(default_factory=list)            # of those, running statistics
    aliases: dict[str, str] = field(default_factory=dict)          # tied name -> the key stored


def plan_merge(base: Checkpoint, tasks: Mapping[str, Checkpoint], private_patterns: Iterable[str] = (),
               statistics: Iterable[str] = (), ties: Mapping[str, str] | None = None) -> Plan:
    """Check every task against θ0 and report *every* problem at once (CheckpointError).

    Keys matching ``private_patterns`` or ``statistics`` are stored whole per task; a private
    pattern that matches nothing is a mistake, a statistics pattern need not match (no BatchNorm).
    """
    patterns = list(private_patterns)
    stats = list(statistics)
    is_private = lambda key: matches(key, patterns) or matches(key, stats)  # noqa: E731
    shared = [k for k in base.keys() if not is_private(k)]
    problems: list[str] = []
    aliases = tie_aliases(base, tasks, dict(ties or {}), problems)
    shared = [k for k in shared if k not in aliases]
    private: dict[str, list[str]] = {}
    for ckpt in [base, *tasks.values()]:
        problems += [f"{ckpt.path}: tensor name {k!r} is empty, has control characters or is not valid UTF-8"
                     for k in ckpt.keys() if bad_name(k)]
    for task, ckpt in tasks.items():
        keys = set(ckpt.keys())
        private[task] = sorted(k for k in keys if is_private(k))
        for k in sorted(set(shared) - keys):
            problems.append(f"{ckpt.path}: task {task!r} lacks {k!r}")
        keys -= set(aliases)
        for k in sorted(keys - set(base.keys())):
            if not is_private(k):
                problems.append(f"{ckpt.path}: task {task!r} has {k!r}, which the base lacks (mark task-private tensors with --private PATTERN)")
        for k in sorted(keys & set(shared)):
            want, got = base.info(k), ckpt.info(k)
            if got.shape != want.shape:
                problems.append(f"{ckpt.path}: {k!r} has shape {list(got.shape)}, base has {list(want.shape)} (a head? mark it --private)")
            elif got.dtype != want.dtype and want.dtype in FLOAT_DTYPES:
                problems.append(f"{ckpt.path}: {k!r} is {got.dtype}, base is {want.dtype}")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(k, p) for c in [base, *tasks.values()] for k in c.keys()):
            raise ConfigError(f"--private pattern {p!r} matches no tensor in the base or any task")
    if problems:
        raise CheckpointError(f"{len(problems)} problem(s) with the task checkpoints:\n  " + "\n  ".join(problems))
    merged = sorted(k for k in shared if base.info(k).dtype in FLOAT_DTYPES)
    carried = sorted(k for k in shared if base.info(k).dtype not in FLOAT_DTYPES)
    stat_keys = sorted({k for keys in private.values() for k in keys if matches(k, stats) and not matches(k, patterns)})
    return Plan(merged, carried, private, stat_keys, {a: c for a, c in sorted(aliases.items()) if c in shared})


def tie_aliases(base: Checkpoint, tasks: Mapping[str, Checkpoint], ties: dict[str, str], problems: list[str]) -> dict[str, str]:
    """alias -> canonical over all inputs: shared storage found in torch files, plus ``ties``
    given by the caller for files that hold both copies (checked byte-identical in every input).
    A name tied in one input must be tied (or absent) in every other."""
    aliases = dict(base.aliases)
    for ckpt in tasks.values():
        for a, c in ckpt.aliases.items():
            aliases.setdefault(a, c)
    for a, c in ties.items():
        if a == c or c in ties:
            raise ConfigError(f"tie {a}={c}: name the tensor to drop first, then the one to keep (no chains)")
        aliases[a] = c
    for a, c in sorted(aliases.items()):
        for ckpt in [base, *tasks.values()]:
            if a in ckpt.aliases:
                if ckpt.aliases[a] != c:
                    problems.append(f"{ckpt.path}: {a!r} is tied to {ckpt.aliases[a]!r} here but to {c!r} elsewhere")
                continue
            if a not in ckpt.keys():
                continue
            if c not in ckpt.keys():
                problems.append(f"{ckpt.path}: {a!r} is tied to {c!r}, which this file lacks")
            elif ckpt.info(a) != ckpt.info(c) or not np.array_equal(ckpt.read(a).view(np.uint8), ckpt.read(c).view(np.uint8)):
                problems.append(f"{ckpt.path}: {a!r} differs from {c!r}, so they are not tied in this file "
                                f"(untied in fine-tuning? then drop the tie{'' if a not in ties else ' given'})")
    return aliases


def nonfinite_problem(path: str, key: str, arr: np.ndarray) -> str | None:
    """A message if ``arr`` holds NaN or Inf (checked in its own dtype: a finite F64 is finite)."""
    if arr.dtype.kind == "f" or arr.dtype == DTYPES.get("BF16"):
        bad = ~np.isfinite(arr if arr.dtype.kind == "f" else arr.astype(np.float32))
        if bad.any():
            return f"{path}: {key!r} has {int(bad.sum())} NaN/Inf value(s)"
    return None
