"""Bit planes at rest: which library codec stores a plane of density p in about H(p) bits (issue 15).

Random planes (i.i.d. bits, the hard case: a real mask's structure only helps) of N elements at
several densities, packed as the bundle packs them (big bit order), compressed with each of the
Python standard library's codecs -- present on every device, no extra wheel -- and decoded again
(best of 3). The bundle uses the codec this table picks: bytes first, decode speed second.

    python bench/planes_bench.py [--numel 8000000] [--no-write]
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import math
import os
import sys
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

CODECS = {
    "zlib -9": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "xz (lzma preset 6; the bundle's)": (lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=6),
                                         lzma.decompress),
    "bz2 -9": (lambda b: bz2.compress(b, 9), bz2.decompress),
}
DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)


def entropy(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=8_000_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.numel
    rows = []
    for p in DENSITIES:
        raw = np.packbits(rng.random(n) < p).tobytes()
        row = [f"{p:g}", f"{entropy(p):.3f}"]
        for name, (comp, dec) in CODECS.items():
            z = comp(raw)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                back = dec(z)
                best = min(best, time.perf_counter() - t0)
            assert back == raw
            row.append(f"{8 * len(z) / n:.3f} ({8 * len(z) / n / entropy(p):.2f}× H) · {n / best / 1e6:.0f} M/s")
        rows.append(row)
    text = table(["density p", "H(p) bits", *(f"{name}: bits/elem · decode" for name in CODECS)], rows)
    print(text)
    print(f"machine: {machine()}")
    if not args.no_write:
        write_section("Bit planes at rest (issue 15)",
                      f"`python bench/planes_bench.py` — {n / 1e6:.0f} M-element random planes, commit {git_rev()}. "
                      "Bits stored per plane element, its ratio to the entropy H(p), and decode speed in million "
                      "plane elements per second (best of 3). The bundle stores planes as xz: closest to H(p) at "
                      "every density below ½, and its decode (once per task, at first use) stays far from a switch's "
                      f"cost.\n\nMachine: {machine()}.\n\n" + text)


if __name__ == "__main__":
    main()
