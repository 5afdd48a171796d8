"""The on-device runtime: imports without torch, and stays small."""

import pathlib
import subprocess
import sys

RUNTIME = pathlib.Path(__file__).resolve().parent.parent / "edgemerge" / "runtime"
LINE_BUDGET = 1000  # all of edgemerge/runtime/*.py; raise it deliberately, not by accident


def test_runtime_imports_with_torch_blocked():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "import edgemerge.runtime, edgemerge.runtime.session\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_runtime_line_budget():
    lines = sum(len(f.read_text().splitlines()) for f in RUNTIME.glob("*.py"))
    assert lines <= LINE_BUDGET, f"edgemerge/runtime has {lines} lines, budget {LINE_BUDGET}"
