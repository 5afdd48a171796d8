"""Structured mutants of a bundle, and what every reader path must do with them (issue 13, item 6).

``mutate`` edits the safetensors header and the manifest as JSON -- values of the wrong type,
list-valued dtypes, deeply nested JSON, integers of thousands of digits, shapes numpy cannot hold,
versions ≤ 0, task fields of the wrong type, broken aliases and checksums, names with newlines --
or the bytes (size field, data). ``check`` opens a mutant with the default options: it must either
be refused with a FormatError, or open, and then ``inspect`` (the real CLI command), ``task_weights``
of every task and ``export flat`` may raise only edgemerge errors, every task's weights must equal
the original's (nothing silently different), and the ``safetensors`` library must open it too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edgemerge.errors import EdgemergeError, FormatError

DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "7" * 5000
ODD_VALUES = [None, True, -1, 0, 2, 1.5, "x", "", [], {}, [1, [2]], {"a": 1}, 2**70, "F32", ["F32"], [0, 2**80],
              [1] * 65, [-1], ["a"], "DEEP", "LONG_INT", float("inf")]
MANIFEST_PATHS = [("format_version",), ("format",), ("tasks",), ("tasks", 0), ("tasks", 0, "name"), ("tasks", 0, "lambda"),
                  ("tasks", 0, "density"), ("tasks", 0, "recon_error"), ("tasks", 1, "name"), ("params",), ("params", 0),
                  ("params", 0, "shape"), ("params", 0, "dtype"), ("params", 0, "role"), ("params", 0, "name"),
                  ("private",), ("private", "t0"), ("vector_dtype",), ("mask",), ("mask", "policy"), ("mask", "bit_order"),
                  ("method",), ("aliases",), ("aliases", "x"), ("options",)]


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header_text: str, rest: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + rest


def _dump(doc) -> str:
    text = json.dumps(doc, separators=(",", ":"), allow_nan=True)
    return text.replace('"DEEP"', DEEP).replace('"LONG_INT"', LONG_INT)


def _set(doc, path, value, rng) -> None:
    node = doc
    for key in path[:-1]:
        if isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(last, int) and last < len(node)):
        if isinstance(node, dict) and rng.random() < 0.15:
            node.pop(last, None)
        else:
            node[last] = value


def mutate(data: bytes, rng) -> bytes:
    header, rest = split(data)
    meta = header.get("__metadata__", {})
    manifest = json.loads(meta["edgemerge.manifest"])
    tensors = [k for k in header if k != "__metadata__"]
    for _ in range(int(rng.integers(1, 3))):
        value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        what = int(rng.integers(7))
        if what <= 2:  # the manifest
            tasks = manifest.get("tasks") if isinstance(manifest, dict) else None
            if rng.random() < 0.3 and isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
                tasks.append(dict(tasks[0]))  # a copy of one task: duplicate names
            else:
                _set(manifest, MANIFEST_PATHS[int(rng.integers(len(MANIFEST_PATHS)))], value, rng)
        elif what == 3:  # a tensor entry's field
            name = tensors[int(rng.integers(len(tensors)))]
            field = ["dtype", "shape", "data_offsets", "extra"][int(rng.integers(4))]
            if isinstance(header.get(name), dict):
                header[name][field] = value
        elif what == 4:  # a tensor renamed: a newline, a slash, empty, another's name
            name = tensors[int(rng.integers(len(tensors)))]
            new = [name + "\n", name + "/x", "", tensors[0], name.replace("/", "\\")][int(rng.integers(5))]
            if name in header:
                header[new] = header.pop(name)
        elif what == 5:  # the checksums or another metadata value
            key = ["edgemerge.sha256", "other"][int(rng.integers(2))]
            meta[key] = value if isinstance(value, str) else _dump(value)
        else:  # bytes: the size field, or a flipped byte anywhere after it
            text = _dump({**header, "__metadata__": {**meta, "edgemerge.manifest": _dump(manifest)}})
            out = bytearray(join(text, rest))
            p = int(rng.integers(len(out)))
            out[p] ^= 1 << int(rng.integers(8))
            return bytes(out)
    meta["edgemerge.manifest"] = _dump(manifest)
    header["__metadata__"] = meta
    return join(_dump(header), rest)


def weights_of(bundle) -> dict[str, dict[str, bytes]]:
    return {t: {k: np.ascontiguousarray(v).tobytes() for k, v in bundle.task_weights(t).items()} for t in bundle.tasks}


def check(path: Path, data: bytes, original: dict[str, dict[str, bytes]], runner, main) -> str:
    """'refused' or 'accepted'; raises AssertionError for anything else."""
    from safetensors import safe_open

    from edgemerge.export.flat import write_flat
    from edgemerge.runtime import open_bundle

    path.write_bytes(data)
    try:
        b = open_bundle(path)
    except FormatError:
        return "refused"
    with safe_open(str(path), "np") as f:  # an accepted bundle is valid safetensors
        assert sorted(f.keys()) == sorted(b.header.tensors)
    shown = runner.invoke(main, ["inspect", str(path)])
    assert shown.exception is None or (isinstance(shown.exception, SystemExit) and shown.exit_code == 2), \
        f"inspect: {type(shown.exception).__name__}: {shown.exception!r}"
    try:
        got = weights_of(b)
        write_flat(b, str(path) + ".img")
    except EdgemergeError:
        return "accepted"
    same = {t: w for t, w in got.items() if t in original}
    assert all(same[t] == original[t] for t in same), "weights differ silently"
    return "accepted"
