#!/usr/bin/env bash
# The one prepared GPU check (issue 7), about 3-5 minutes on an H100: the CUDA tests, then the GPU
# switch benchmark, which rewrites the "Task switching on a GPU" section of docs/BENCHMARKS.md.
# Run from anywhere on a machine with an NVIDIA GPU, torch with CUDA and Triton:
#     bash bench/gpu_check.sh
# TensorRT tests run too when `tensorrt` imports; otherwise pytest reports them skipped, with why.
# When $OUT is set (the device tool), the report and the updated BENCHMARKS.md are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
try:
    import tensorrt
    trt = tensorrt.__version__
except ImportError:
    trt = "not installed"
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; Triton {tv}; TensorRT {trt}")
PYEOF
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_torch_backend.py $(ls tests/test_tensorrt.py 2>/dev/null || true) 2>&1 | tee gpu_tests.log
"$PY" bench/gpu_switch_bench.py 2>&1 | tee gpu_bench.log
if [ -n "${OUT:-}" ]; then
    cp docs/BENCHMARKS.md gpu_tests.log gpu_bench.log "$OUT/"
fi
rm -f gpu_tests.log gpu_bench.log
