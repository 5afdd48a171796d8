"""The on-device runtime: imports without torch, and stays small."""

import pathlib
import subprocess
import sys

RUNTIME = pathlib.Path(__file__).resolve().parent.parent / "edgemerge" / "runtime"
# Raise these deliberately, not by accident. The core is what every device gets (numpy + ONNX
# Runtime); the GPU backends are imported only where torch / Triton / TensorRT are installed.
GPU_BACKENDS = {"torch_backend.py", "triton_kernel.py", "trt_backend.py"}
# Core raised from 1000 for the C kernel dispatch (kernel.py), then from 1050 to 1200 for issue 12
# (sessions mode's skeleton + external initializers and option copying, tied names, the half
# kernel), then to 1300 for issue 13: integrity checks (first-use sha256, truncation/rewrite) and
# TaskSession's input checks (lossless integer widening, one-line dtype/shape errors), then to
# 1360 for issue 16: weights the switchable graph takes transposed (θ0/τ kept in that order,
# masks permuted once per task) and the resident-bytes report; then to 1770 (GPU 640) for issue 15:
# format v2's per-task codecs (runtime/codecs.py: the rules, the tswitch and quantized-delta kernel
# dispatch, the planes decoder; the reader's v2 checks; every backend rebuilding every codec); then
# to 1890 for the switch plan (issues 15/16: a switch is one C call per thread over every param, not
# a Python call per tensor; each rule's C job builder, shared by the one-param path), and to 1960
# for tall's least-squares scale (one more rule: the scaled select) and the emr codec (that rule over
# the elected vector, which every backend keeps beside τ_MTL), and to 2010 for a quantized delta's
# codes stored as one xz stream (format v2 `codes: xz`: the bounded decoder, its checks, the reader's
# decode-once cache shared with the planes), and to 2030 for issue 16's per-call path: inputs mode
# runs through a per-thread IOBinding whose weights are bound once per switch, and to 2100 for
# export layout="auto": a second graph with the same feeds, checked at load, timed per input shape,
# and to 2170 for `codes: lowrank` (issue 15: the record decoder and its checks, the exact integer
# rule over int8 factors) and TaskSession.layout(inputs) (the feeds check shared with run), and to
# 2215 for format v3: one scales tensor per quantized-delta task (its offsets and checks; v2 files
# still read) and private tensors stored in F16 / BF16 (the codec's record of them, the reader's
# checks and float32 serving, one dtype accessor every backend asks).
CORE_BUDGET, GPU_BUDGET = 2215, 640


def test_runtime_imports_with_torch_blocked():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; sys.modules['tensorrt'] = None\n"
            "import edgemerge.runtime, edgemerge.runtime.session, edgemerge.runtime.torch_backend\n"
            "import edgemerge.runtime.trt_backend\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _lines(files) -> int:
    return sum(len(f.read_text().splitlines()) for f in files)


def test_runtime_line_budget():
    files = sorted(RUNTIME.glob("*.py"))
    core = _lines(f for f in files if f.name not in GPU_BACKENDS)
    gpu = _lines(f for f in files if f.name in GPU_BACKENDS)
    assert core <= CORE_BUDGET, f"edgemerge/runtime core has {core} lines, budget {CORE_BUDGET}"
    assert gpu <= GPU_BUDGET, f"edgemerge/runtime GPU backends have {gpu} lines, budget {GPU_BUDGET}"
