"""Writing safetensors files: deterministic bytes, streamed, atomic, with per-tensor sha256.

Tensors are laid out in a fixed order -- by dtype size, largest first, then by name -- so every
tensor starts at a multiple of its itemsize (the header is padded with spaces to a multiple of 8)
and the bytes depend only on the tensors and metadata, never on dict order. A tensor may be given
lazily (``Lazy``): it is produced only when its turn comes and dropped right after, so peak memory
is one tensor. The file appears under its final name only once complete (temp file + fsync +
os.replace); on any error the temp file is removed and an existing file is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Union

import numpy as np

from .errors import ConfigError, EdgemergeError, FormatError
from .runtime.dtypes import DTYPES, dtype_name
from .runtime.safetensors import MAX_HEADER_BYTES, bad_name

CHECKSUM_KEY = "edgemerge.sha256"


@dataclass(frozen=True)
class Lazy:
    """A tensor whose bytes are produced on demand by ``produce()``."""

    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


TensorLike = Union[np.ndarray, Lazy]


def _spec(name: str, t: TensorLike) -> tuple[str, tuple[int, ...]]:
    if isinstance(t, Lazy):
        return t.dtype, tuple(t.shape)
    return dtype_name(t.dtype), tuple(t.shape)


def _materialize(name: str, t: TensorLike, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = t.produce() if isinstance(t, Lazy) else t
    arr = np.asarray(arr)
    if arr.dtype != DTYPES[dtype] or tuple(arr.shape) != shape:
        raise FormatError(f"tensor {name!r}: produced {arr.dtype} {arr.shape}, declared {dtype} {shape}")
    return np.ascontiguousarray(arr)


def layout_order(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Names in file order: larger itemsize first (keeps every tensor aligned), then by name."""
    return sorted(specs, key=lambda n: (-DTYPES[specs[n][0]].itemsize, n))


def _header_bytes(specs, order, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    checksums: bool = True,
    progress: Callable[[str, int], None] | None = None,
    check: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Write ``tensors`` to ``path`` atomically; return the per-tensor sha256 hex digests.

    Every rule the reader enforces on names and header size is checked before a byte is written;
    ``check(temp_path)`` (e.g. the bundle reader) runs on the complete file before it replaces
    ``path``, so a file the reader would refuse never replaces anything.

    With ``checksums`` the metadata gains ``edgemerge.sha256``: a JSON object name -> sha256 of
    the tensor's bytes. Digests have a fixed length, so the header is written with placeholders,
    the data streamed while hashing, and the header rewritten in place with the same length.

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> sorted(write_safetensors(d + "/x.safetensors", {"a": np.zeros(2, np.float32)}))
    ['a']
    """
    path = os.fspath(path)
    bad = sorted(repr(n) for n in tensors if not isinstance(n, str) or bad_name(n))
    if bad:
        raise FormatError(f"{path}: tensor names must be non-empty, without control characters: {', '.join(bad[:5])}; "
                          "nothing was written")
    specs = {name: _spec(name, t) for name, t in tensors.items()}
    order = layout_order(specs)
    meta = dict(metadata or {})
    if CHECKSUM_KEY in meta:
        raise FormatError(f"metadata key {CHECKSUM_KEY!r} is reserved for the writer")
    digests = {name: "0" * 64 for name in order}
    if checksums:
        meta[CHECKSUM_KEY] = json.dumps(digests, sort_keys=True, separators=(",", ":"))
    head = _header_bytes(specs, order, meta)
    if len(head) - 8 > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: the header would be {len(head) - 8:,} bytes, over the {MAX_HEADER_BYTES:,}-byte cap of "
                          f"safetensors readers ({len(specs):,} tensors); nothing was written. Split the model or merge "
                          "fewer tasks per bundle")
    try:
        with atomic_output(path, check) as tmp, open(tmp, "r+b") as f:
            f.write(head)
            for name in order:
                arr = _materialize(name, tensors[name], *specs[name])
                data = memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b""
                if checksums:
                    digests[name] = hashlib.sha256(data).hexdigest()
                f.write(data)
                if progress is not None:
                    progress(name, arr.nbytes)
                del arr, data
            if checksums:
                meta[CHECKSUM_KEY] = json.dumps(digests, sort_keys=True, separators=(",", ":"))
                final = _header_bytes(specs, order, meta)
                assert len(final) == len(head), "digest placeholders must keep the header length"
                f.seek(0)
                f.write(final)
    except OSError as exc:
        if isinstance(exc, EdgemergeError):
            raise
        raise EdgemergeError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from exc
    return digests


@contextmanager
def atomic_output(path: str | os.PathLike, check: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success fsync it, run ``check(temp)`` if given, rename
    it over ``path`` and fsync the folder. On any error -- ``check`` raising included -- the temp
    file is removed and an existing ``path`` is untouched.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> with atomic_output(d + "/x.bin") as tmp:
    ...     _ = open(tmp, "wb").write(b"ok")
    >>> open(d + "/x.bin", "rb").read()
    b'ok'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    remove_stale(directory, f".{os.path.basename(path)}.", ".tmp")
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror} (does {directory} exist, and may you write there?)") from None
    os.close(fd)
    try:
        try:
            yield tmp
        except OSError as exc:  # a full or read-only disk, a folder removed under us: one line, nothing lost
            raise EdgemergeError(f"{path}: write failed ({exc.strerror or exc}); nothing was written and any "
                                 "previous file is untouched") from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600; a new file gets what the umask gives
        os.replace(tmp, path)  # replaces a symlink at `path` too: the file it pointed to is not written
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def current_umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale(directory: str, prefix: str, suffix: str = "") -> None:
    """Remove leftovers named ``<prefix><pid>.…<suffix>`` whose process is gone (a writer killed
    with SIGKILL cannot clean up after itself); anything of a live process is left alone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):].split(".", 1)[0].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        full = os.path.join(directory, name)
        if os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            _unlink_quietly(full)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_inputs(output: str | os.PathLike, inputs, what: str = "input") -> None:
    """ConfigError when ``output`` is one of ``inputs`` (the same file, through any link; for a
    folder input, any file in it): a writer must never replace what it reads."""
    output = os.fspath(output)
    if not os.path.exists(output):
        return
    for item in inputs:
        item = os.fspath(item)
        files = [os.path.join(item, f) for f in os.listdir(item)] if os.path.isdir(item) else [item]
        for f in files:
            if os.path.exists(f) and os.path.samefile(output, f):
                raise ConfigError(f"refusing to write {output}: it is the {what} {f}; choose another output path")


def check_writable(path: str | os.PathLike) -> None:
    """ConfigError unless ``path`` could be created: its folder exists and is writable (checked
    before a long job starts, not after it)."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise ConfigError(f"cannot write {os.fspath(path)}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {os.fspath(path)}: no permission to write in {directory}")
