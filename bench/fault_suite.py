"""Path and fault suite (issue 13): count the cases in which a file is lost or left partial (goal: 0).

Every case starts from real inputs and, where it matters, a previous output with known bytes, runs
one operation through the CLI (a real subprocess) or the library, and then checks that the inputs
and the previous output are byte-identical or replaced by a complete, valid file -- never partial,
never an input overwritten -- and that no temp file is left. Cases: every writer pointed at its own
inputs (same path, relative path, symlink, hard link), final checks that fail over an existing
output, a disk that fills mid-write (RLIMIT_FSIZE), SIGKILL at random moments of a merge, outputs
that are symlinks to other files. Counts go to docs/RELIABILITY.md.

    python bench/fault_suite.py [--kills 12] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import RELIABILITY, git_rev, machine, table, write_section  # noqa: E402

from edgemerge.runtime import open_bundle  # noqa: E402


def digest(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def cli(*args, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # a disk that is full after limit_bytes of any one file
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return subprocess.run([sys.executable, "-m", "edgemerge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def suite(d: Path, n: int = 200_000) -> tuple[Path, dict[str, Path]]:
    rng = np.random.default_rng(0)
    base = {f"w{i}": rng.standard_normal(n // 4).astype(np.float32) for i in range(4)}
    save_file(base, str(d / "base.safetensors"))
    tasks = {}
    for t in range(3):
        save_file({k: v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()},
                  str(d / f"t{t}.safetensors"))
        tasks[f"t{t}"] = d / f"t{t}.safetensors"
    return d / "base.safetensors", tasks


def temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows, lost = [], 0
    with tempfile.TemporaryDirectory(prefix="edgemerge-faults-") as tmp:
        d = Path(tmp)
        base, tasks = suite(d)
        task_args = [a for t, p in tasks.items() for a in ("--task", f"{t}={p}")]
        bundle = d / "bundle.safetensors"
        assert cli("merge", base, *task_args, "-o", bundle, "--quiet").returncode == 0
        inputs = [base, *tasks.values(), bundle]
        before = {p: digest(p) for p in inputs}

        def case(name: str, run, expect_fail: bool = True) -> None:
            nonlocal lost
            p = run()
            ok = all(digest(q) == before[q] for q in inputs) and not temp_files(d)
            clean = (p.returncode == 2 and "Traceback" not in p.stderr) if expect_fail else p.returncode == 0
            lost += not ok
            rows.append([name, "kept" if ok else "**LOST**", "one-line error" if clean and expect_fail else
                         ("ok" if clean else f"rc {p.returncode}: {p.stderr.strip()[-80:]}")])

        (d / "link.safetensors").symlink_to(base)
        os.link(base, d / "hard.safetensors")
        for how, target in (("same path", base), ("symlink", d / "link.safetensors"), ("hard link", d / "hard.safetensors")):
            case(f"merge -o the base ({how})", lambda t=target: cli("merge", base, *task_args, "-o", t, "--quiet"))
        case("merge -o a task file", lambda: cli("merge", base, *task_args, "-o", tasks["t1"], "--quiet"))
        case("extract -o the bundle", lambda: cli("extract", bundle, "--task", "t0", "-o", bundle))
        case("export flat -o the bundle", lambda: cli("export", "flat", bundle, "-o", bundle))
        case("merge -o a missing folder", lambda: cli("merge", base, *task_args, "-o", d / "no" / "x.safetensors", "--quiet"))
        torch.save({"w0": torch.zeros(3), "bad\nname": torch.zeros(2)}, d / "badname.pt")
        torch.save({"w0": torch.ones(3), "bad\nname": torch.ones(2)}, d / "badname_t.pt")
        case("merge whose final check fails, over the bundle",
             lambda: cli("merge", d / "badname.pt", "--task", f"a={d / 'badname_t.pt'}", "-o", bundle, "--quiet"))
        case("merge over the bundle, disk full after 1 MB",
             lambda: cli("merge", base, *task_args, "-o", bundle, "--quiet", limit_bytes=1 << 20))
        case("export flat over the bundle's image, disk full after 64 KB",
             lambda: cli("export", "flat", bundle, "-o", d / "img.bin", limit_bytes=1 << 16))
        victim = d / "victim.bin"
        victim.write_bytes(b"must survive")
        inputs.append(victim)
        before[victim] = digest(victim)
        (d / "out-link.safetensors").symlink_to(victim)
        case("merge -o a symlink to another file", lambda: cli("merge", base, *task_args, "-o", d / "out-link.safetensors",
                                                               "--quiet"), expect_fail=False)
        # SIGKILL at random moments of a merge that replaces the bundle: old or new, never partial
        rng, kills_ok = np.random.default_rng(1), 0
        for _ in range(args.kills):
            proc = subprocess.Popen([sys.executable, "-m", "edgemerge.cli", "merge", base, *task_args, "-o", bundle, "--quiet"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(float(rng.uniform(0.2, 2.5)))
            proc.kill()
            proc.wait()
            try:
                open_bundle(bundle, verify="open").close()
                kills_ok += 1
            except Exception:  # noqa: BLE001 - counted as a loss
                lost += 1
        # a killed merge leaves pid-named scratch; the next write removes it
        assert cli("merge", base, *task_args, "-o", bundle, "--quiet").returncode == 0
        leftovers = temp_files(d)
        lost += bool(leftovers)
        rows.append([f"SIGKILL at a random moment of a merge over the bundle, ×{args.kills}",
                     f"valid bundle {kills_ok}/{args.kills}", f"leftovers after the next merge: {leftovers or 'none'}"])
    text = table(["case", "inputs and previous output", "what the user saw"], rows)
    print(text)
    print(f"files lost or partial: {lost}; machine: {machine()}")
    if not args.no_write:
        write_section("Path and fault suite (issue 13)", f"`python bench/fault_suite.py` — commit {git_rev()}. Machine: "
                      f"{machine()}.\n\n{text}\n\nFiles lost or left partial: **{lost}** (goal 0). Run as root here, so "
                      "permission cases (a read-only folder) are not in this table; `edgemerge.io.check_writable` covers them "
                      "for other users.", doc=RELIABILITY)


if __name__ == "__main__":
    main()
