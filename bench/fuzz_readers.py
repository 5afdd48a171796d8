"""Fuzz the readers (issue 6): ≥ 100,000 mutated bundles, flat images and checkpoints.

Mutations: bit flips, truncations, 8-byte overwrites with huge numbers (sizes, offsets, counts),
insertions that shift every later byte, and targeted header edits (a 10 GB claimed header, a
tensor whose offsets overlap its neighbour, huge shapes). Every case must either load -- and then
rebuild every task without error -- or raise EdgemergeError. Anything else is a crash and is
printed with its seed. Peak RSS shows that absurd claimed sizes are never allocated.

    python bench/fuzz_readers.py [--cases 100000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RELIABILITY, git_rev, machine, table, write_section  # noqa: E402

from edgemerge.checkpoints import open_checkpoint  # noqa: E402
from edgemerge.errors import EdgemergeError  # noqa: E402
from edgemerge.export.flat import read_flat, write_flat  # noqa: E402
from edgemerge.pipeline import MergeConfig, merge  # noqa: E402
from edgemerge.runtime import open_bundle  # noqa: E402


def seed_files(d: str) -> dict[str, bytes]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {"a.weight": rng.standard_normal((6, 5)).astype(np.float32), "a.bias": rng.standard_normal(6).astype(np.float32)}
    save_file(base, f"{d}/base.safetensors")
    tasks = {}
    for t in range(2):
        sd = {k: v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
        sd["head.weight"] = rng.standard_normal((t + 2, 6)).astype(np.float32)
        save_file(sd, f"{d}/t{t}.safetensors")
        tasks[f"t{t}"] = f"{d}/t{t}.safetensors"
    merge(MergeConfig(f"{d}/base.safetensors", tasks, "ties", private=("head.*",)), f"{d}/b.safetensors")
    write_flat(f"{d}/b.safetensors", f"{d}/b.flat")
    return {k: open(f"{d}/{f}", "rb").read() for k, f in
            (("bundle", "b.safetensors"), ("flat", "b.flat"), ("checkpoint", "t0.safetensors"))}


def header_edit(data: bytes, rng) -> bytes:
    (n,) = struct.unpack_from("<Q", data)
    choice = rng.integers(4)
    if choice == 0:
        return struct.pack("<Q", 10 << 30) + data[8:]                  # 10 GB claimed header
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return data
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return data
    name = names[rng.integers(len(names))]
    if not isinstance(header[name], dict) or not isinstance(header[name].get("data_offsets"), list) \
            or len(header[name]["data_offsets"]) != 2:
        return data  # an earlier mutation already broke this entry
    if choice == 1:
        header[name]["data_offsets"][0] = max(0, int(header[name]["data_offsets"][0]) - 4)   # overlap
    elif choice == 2:
        header[name]["shape"] = [1 << 40, 1 << 30]                                        # huge shape
    else:
        header[name]["data_offsets"] = [0, 1 << 62]                                       # huge offsets
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        kind, p = rng.integers(5), int(rng.integers(max(len(b), 1)))
        if kind == 0 and b:
            b[p] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del b[p:]
        elif kind == 2:
            b[p:p + 8] = int(rng.integers(1 << 62)).to_bytes(8, "little")
        elif kind == 3:
            b[p:p] = bytes(int(rng.integers(1, 16)))
        else:
            return header_edit(bytes(b), rng) if len(b) > 8 else bytes(b)
    return bytes(b)


def check(kind: str, path: str, verify: bool) -> None:
    if kind == "bundle":
        with open_bundle(path, verify=verify) as b:
            for t in b.tasks:
                b.task_weights(t)
    elif kind == "flat":
        read_flat(path)
    else:
        c = open_checkpoint(path)
        for k in c.keys():
            c.read(k)
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="edgemerge-fuzz-")
    seeds = seed_files(d)
    counts = {k: {"cases": 0, "rejected": 0, "loaded": 0, "crashes": 0} for k in seeds}
    t0 = time.perf_counter()
    for i in range(args.cases):
        kind = list(seeds)[i % len(seeds)]
        rng = np.random.default_rng(i)
        path = f"{d}/case.{'flat' if kind == 'flat' else 'safetensors'}"
        with open(path, "wb") as f:
            f.write(mutate(seeds[kind], rng))
        counts[kind]["cases"] += 1
        try:
            check(kind, path, verify=(i // len(seeds)) % 2 == 0)
            counts[kind]["loaded"] += 1
        except EdgemergeError:
            counts[kind]["rejected"] += 1
        except Exception:  # anything but our own error is a finding
            counts[kind]["crashes"] += 1
            print(f"CRASH kind={kind} case={i}\n{traceback.format_exc()}", flush=True)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [[k, f"{v['cases']:,}", f"{v['rejected']:,}", f"{v['loaded']:,}", str(v["crashes"])] for k, v in counts.items()]
    text = table(["reader", "cases", "rejected (EdgemergeError)", "loaded and rebuilt", "crashes (goal 0)"], rows)
    total = sum(v["crashes"] for v in counts.values())
    summary = f"{args.cases:,} cases in {secs:.0f} s; crashes: {total}; peak RSS {rss / 2**20:.0f} MiB (10 GB claims are refused before any allocation)."
    print(text)
    print(summary)
    if not args.no_write:
        write_section("Fuzzing the readers", f"`python bench/fuzz_readers.py --cases {args.cases}` — commit {git_rev()}.\n\n"
                      f"Machine: {machine()}.\n\n{text}\n\n{summary}", RELIABILITY)

if __name__ == "__main__":
    main()
