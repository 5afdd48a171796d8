"""Structured mutants of a flat image, and the Python reader vs the C applier on each (issue 13).

``mutants`` edits the fields the readers check -- header counts and offsets, every field of a table
row, task rows (duplicate names), rows copied over rows, name bytes (mismatches, NUL), data bytes,
truncation -- with boundary values (0, 1, NONE, 2^31, 2^32 − 1, a neighbour's value, ±1, ±align).
``compare`` runs both readers on one image for every task: they must both refuse, or both produce
the same float32 bytes. Used by tests/test_flat_differential.py and bench/flat_differential.py.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np

from edgemerge.errors import EdgemergeError
from edgemerge.export.flat import ENTRY, HEADER, TASK, rebuild

ROOT = Path(__file__).resolve().parent.parent
ENTRY_FIELDS = [(0, "I"), (4, "I"), (8, "I"), (12, "I"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "i"), (44, "I"),
                (48, "I"), (52, "I")] + [(56 + 4 * k, "I") for k in range(8)] + [(88, "I")]
HEADER_FIELDS = [(12, "I"), (16, "I"), (20, "I"), (24, "I"), (32, "Q"), (40, "Q"), (48, "Q"), (56, "Q")]


def build_library(directory: Path) -> ctypes.CDLL:
    """The C applier as a shared library (its main() left out), loaded with ctypes."""
    so = directory / "libemflat.so"
    subprocess.run(["cc", "-std=c99", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-DEMFLAT_NO_MAIN", "-o", str(so),
                    str(ROOT / "edgemerge/devices/c/emflat.c")], check=True)
    lib = ctypes.CDLL(str(so))
    lib.emflat_rebuild.restype = ctypes.c_int
    lib.emflat_rebuild.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.POINTER(ctypes.c_float),
                                   ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p, ctypes.c_size_t]
    return lib


def c_rebuild(lib, data: bytes, task: str) -> bytes | None:
    cap = len(data) // 2 + 1  # every merged element holds at least a 2-byte base value
    out = (ctypes.c_float * cap)()
    n = ctypes.c_uint64(0)
    err = ctypes.create_string_buffer(256)
    rc = lib.emflat_rebuild(data, len(data), task.encode(), out, cap, ctypes.byref(n), err, 256)
    return None if rc != 0 else bytes(memoryview(out).cast("B")[: 4 * n.value])


def py_rebuild(path: Path, data: bytes, task: str) -> bytes | None:
    path.write_bytes(data)
    try:
        parts = rebuild(str(path), task)
    except EdgemergeError:
        return None
    return b"".join(np.ascontiguousarray(v, "<f4").tobytes() for v in parts.values())


def compare(lib, path: Path, data: bytes, tasks: list[str]) -> str | None:
    """None when both readers agree on every task (and an unknown one); else what differed."""
    for task in [*tasks, "no-such-task"]:
        c, py = c_rebuild(lib, data, task), py_rebuild(path, data, task)
        if (c is None) != (py is None):
            return f"task {task!r}: C {'refused' if c is None else 'accepted'}, Python {'refused' if py is None else 'accepted'}"
        if c is not None and c != py:
            return f"task {task!r}: both accepted, different θ_t bytes"
    return None


def _boundary(rng, old: int, other: int, align: int, signed: bool) -> int:
    pool = [0, 1, 2, 3, old + 1, max(old - 1, 0), other, old + align, max(old - align, 0), 0xFFFFFFFF, 1 << 31,
            int(rng.integers(0, 1 << 16))]
    v = pool[int(rng.integers(len(pool)))]
    return v - (1 << 32) if signed and v >= 1 << 31 else v


def mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    n, n_tasks = int.from_bytes(b[20:24], "little"), int.from_bytes(b[24:28], "little")
    names_off = int.from_bytes(b[40:48], "little")
    align = int.from_bytes(b[16:20], "little") or 64
    tasks_off = HEADER.size + ENTRY.size * n
    for _ in range(int(rng.integers(1, 4))):
        what = int(rng.integers(8))
        if what <= 2 and n:  # a field of a table row
            i, j = int(rng.integers(n)), int(rng.integers(n))
            off, fmt = ENTRY_FIELDS[int(rng.integers(len(ENTRY_FIELDS)))]
            size = 8 if fmt == "Q" else 4
            at, other_at = HEADER.size + ENTRY.size * i + off, HEADER.size + ENTRY.size * j + off
            if other_at + size > len(b) or at + size > len(b):
                continue
            old, other = (int.from_bytes(b[x:x + size], "little") for x in (at, other_at))
            v = _boundary(rng, old, other, align, fmt == "i")
            b[at:at + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
        elif what == 3 and n > 1:  # a row copied over another (duplicate names, vectors, masks)
            i, j = (HEADER.size + ENTRY.size * int(rng.integers(n)) for _ in range(2))
            b[i:i + ENTRY.size] = b[j:j + ENTRY.size]
        elif what == 4 and n_tasks:  # a task row: another task's name (duplicates), or bounds
            i, j = (tasks_off + TASK.size * int(rng.integers(n_tasks)) for _ in range(2))
            if rng.random() < 0.6:
                b[i:i + TASK.size] = b[j:j + TASK.size]
            else:
                b[i + 4:i + 8] = int(rng.integers(0, 40)).to_bytes(4, "little")
        elif what == 5:  # a header field
            off, fmt = HEADER_FIELDS[int(rng.integers(len(HEADER_FIELDS)))]
            size = 8 if fmt == "Q" else 4
            old = int.from_bytes(b[off:off + size], "little")
            b[off:off + size] = (_boundary(rng, old, old, align, False) % (1 << (8 * size))).to_bytes(size, "little")
        elif what == 6 and names_off < len(b):  # a byte of the names blob: mismatched names, NUL, bad UTF-8
            p = names_off + int(rng.integers(max(1, min(len(b) - names_off, 400))))
            b[p] = [0, 0xFF, ord("x"), b[p] ^ 0x20][int(rng.integers(4))]
        else:  # data bytes, or the end of the file
            if rng.random() < 0.7 and len(b) > 64:
                p = int(rng.integers(64, len(b)))
                b[p] ^= 1 << int(rng.integers(8))
            else:
                b = b[: int(rng.integers(len(b)))] if rng.random() < 0.5 else b + bytes(int(rng.integers(1, 70)))
    return bytes(b)


def seed_images(directory: Path) -> dict[str, tuple[bytes, list[str]]]:
    """Real images: merged, carried and private entries, masks, 3 tasks, in each encoding; and
    version 2 images of the same tasks under three codecs, from float32 and float16 models."""
    from safetensors.numpy import load_file, save_file

    from edgemerge.codecs import encode_bundle, parse_codec
    from edgemerge.export.flat import write_flat
    from edgemerge.pipeline import MergeConfig, merge
    from edgemerge.runtime import open_bundle

    rng = np.random.default_rng(0)
    base = {"a.weight": rng.standard_normal((6, 5)).astype(np.float32), "a.bias": rng.standard_normal(6).astype(np.float32),
            "frozen": np.ones(4, np.float32), "steps": np.array([3, 4], np.int64), "e": np.zeros((0, 3), np.float32)}
    save_file(base, str(directory / "base.safetensors"))
    tasks = {}
    for t in range(3):
        sd = {k: (v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32)) if k in ("a.weight", "a.bias") else v
              for k, v in base.items()}
        sd["head.weight"] = rng.standard_normal((t + 2, 6)).astype(np.float32)
        save_file(sd, str(directory / f"t{t}.safetensors"))
        tasks[f"t{t}"] = str(directory / f"t{t}.safetensors")
    out = directory / "b.safetensors"
    merge(MergeConfig(str(directory / "base.safetensors"), tasks, "ties", private=("head.*",)), out)
    names = list(open_bundle(out).tasks)
    images = {}
    for enc in ("F32", "F16", "Q16"):
        write_flat(str(out), str(directory / f"b.{enc}.img"), encoding=enc)
        images[enc] = ((directory / f"b.{enc}.img").read_bytes(), names)
    # version 2: every per-task codec's entries (signs, scales, δ, corrections), float32 and fp16 models
    for dtype in (np.float32, np.float16):
        sub = directory / np.dtype(dtype).name
        sub.mkdir(exist_ok=True)
        half_base = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in base.items()}
        save_file(half_base, str(sub / "base.safetensors"))
        half_tasks = {}
        for t, path in tasks.items():
            sd = {k: v.astype(dtype) if v.dtype == np.float32 and k != "head.weight" else v for k, v in load_file(path).items()}
            save_file(sd, str(sub / f"{t}.safetensors"))
            half_tasks[t] = str(sub / f"{t}.safetensors")
        v1 = sub / "b.safetensors"
        merge(MergeConfig(str(sub / "base.safetensors"), half_tasks, "ties", private=("head.*",)), v1)
        v2 = sub / "v2.safetensors"
        encode_bundle(str(v1), half_tasks, dict(zip(half_tasks, map(parse_codec, V2_MIX))), str(v2))
        for enc in ("F32", "Q16"):
            img = sub / f"v2.{enc}.img"
            write_flat(str(v2), str(img), encoding=enc)
            images[f"v2-{np.dtype(dtype).name}-{enc}"] = (img.read_bytes(), names)
    return images


V2_MIX = ("tswitch:density=0.3,correction=0.05", "delta:dtype=I4,correction=0.05", "tall:planes=raw,scale=ls")
