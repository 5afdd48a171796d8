"""Helpers shared by the benchmark scripts: machine description and the BENCHMARKS.md writer."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"float32 switch kernel {_kernel()}")


def _kernel() -> str:
    """The float32 kernel this process switches with: a switch timed without the C extension (a
    checkout whose _cmask was never built) runs numpy's codec paths at several times a memcpy, so
    every table names it."""
    from edgemerge.runtime.kernel import _cmask, kernel_name
    name = kernel_name()
    return name if _cmask() is not None else f"{name} (C extension off or not built: codec switches run numpy, not comparable)"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=DOC.parent.parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RELIABILITY = DOC.parent / "RELIABILITY.md"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``## name`` of ``doc`` (docs/BENCHMARKS.md), keeping the others."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else f"# {doc.stem.title()}\n\nEvery figure here is printed by a script in `bench/`; rerun it to check.\n"
    start_tag, end_tag = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start_tag}\n## {name}\n\n{body.strip()}\n{end_tag}"
    if start_tag in text:
        pre, rest = text.split(start_tag, 1)
        text = pre + block + rest.split(end_tag, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
