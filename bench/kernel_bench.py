"""The mask kernel alone on 88 M parameters (one flat array): each implementation vs a memcpy.

    python bench/kernel_bench.py [--numel 88000000] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402

from edgemerge.measure import best_of  # noqa: E402
import edgemerge.runtime.kernel as kernel  # noqa: E402
from edgemerge.runtime.kernel import _apply_blocked, apply_mask, apply_mask_reference  # noqa: E402


def forced(c, fused):
    """apply_mask with the C kernel and/or numba switched off (the module picks what is left)."""
    def run(base, vec, packed, out):
        saved = kernel._C, kernel._FUSED
        kernel._C, kernel._FUSED = (saved[0] if c else False), (saved[1] if fused else False)
        try:
            apply_mask(base, vec, packed, out)
        finally:
            kernel._C, kernel._FUSED = saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--numel", type=int, default=88_000_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.numel
    base, vec = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    packed, out = np.packbits(rng.random(n) < 0.3), np.empty(n, np.float32)
    apply_mask(base, vec, packed, out)  # compile numba, start the C kernel's threads
    numba_only, c_only = forced(False, True), forced(True, False)
    numba_only(base, vec, packed, out)
    ref = apply_mask_reference(base, vec, packed).tobytes()
    slow = [
        ("naive numpy: θ0 + unpackbits(m)·τ", lambda: base + np.unpackbits(packed, count=n).astype(np.float32) * vec),
        ("reference select (np.where)", lambda: apply_mask_reference(base, vec, packed)),
        ("blocked numpy (fallback without numba or C)", lambda: _apply_blocked(base, vec, packed, out)),
    ]
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    cuts = np.linspace(0, n, (os.cpu_count() or 1) + 1).astype(int)

    def copy_threads():  # np.copyto releases the GIL: the same split the C kernel uses
        list(pool.map(lambda k: np.copyto(out[cuts[k]:cuts[k + 1]], base[cuts[k]:cuts[k + 1]]), range(len(cuts) - 1)))

    fast = [
        ("memcpy (np.copyto, 1 thread)", lambda: np.copyto(out, base)),
        ("memcpy, a thread per core (reference only)", copy_threads),
        ("fused numba loop (parallel)", lambda: numba_only(base, vec, packed, out)),
        (f"C kernel ({kernel._cmask().simd() if kernel._cmask() else 'not built'}; a thread per core)",
         lambda: c_only(base, vec, packed, out)),
        (f"apply_mask as installed (picks {kernel.kernel_name()})", lambda: apply_mask(base, vec, packed, out)),
    ]
    # the fast ones interleaved, round after round, best of each: memory bandwidth on a shared
    # machine drifts by tens of percent within a minute, and a ratio must compare like with like
    best = {name: float("inf") for name, _ in fast}
    for _ in range(args.rounds):
        for name, fn in fast:
            best[name] = min(best[name], best_of(fn, 1))
            if not name.startswith("memcpy"):
                assert out.tobytes() == ref, name
    copy = best[fast[0][0]]
    rows = [[name, f"{1e3 * best[name]:.1f} ms", f"{best[name] / copy:.2f}×"] for name, _ in fast]
    for name, fn in slow:
        t = best_of(fn, 2)
        rows.append([name, f"{1e3 * t:.1f} ms", f"{t / copy:.2f}×"])
    text = table(["implementation", "time", "vs memcpy"], rows)
    print(text)
    print(f"machine: {machine()}")
    if not args.no_write:
        write_section("Mask kernel", f"`python bench/kernel_bench.py` — {n / 1e6:.0f} M float32 parameters, 30% of mask bits set, "
                      f"best of {args.rounds} interleaved rounds, commit {git_rev()}.\n\nMachine: {machine()}.\n\n{text}")


if __name__ == "__main__":
    main()
