"""Task switching on a CUDA GPU (issue 7): fused Triton kernel vs torch ops vs a device copy.

    python bench/gpu_switch_bench.py            # run by bench/gpu_check.sh; needs an NVIDIA GPU

1. The mask kernel alone on flat fp32 arrays of 12 M / 88 M / 350 M parameters: a device-to-device
   copy of θ0 (the floor's reference), the fused Triton kernel, torch ops (unpack + where); each
   median of CUDA-event timings, side by side in one run; outputs compared bit for bit.
2. Getting weights onto the device: host→device of fp32 weights vs of the packed mask (pinned).
3. End to end: ``TorchTaskModel`` on a ViT-B-sized model (86 M), 4 tasks, TALL bundle: ``switch``
   (two device synchronizations included; the model's parameters are views into the kernel's output,
   so there is no hand-off) vs a device copy of the same bytes, and inference after a switch.

Writes the section "Task switching on a GPU" of docs/BENCHMARKS.md with the card's name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_rev, machine, table, write_section  # noqa: E402
from switch_bench import make_vit_suite  # noqa: E402


def cuda_seconds(fn, reps: int = 50) -> float:
    import torch

    for _ in range(10):  # compile, and let the clocks ramp up
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def kernel_rows(cases: list[tuple[int, str]]) -> list[list[str]]:
    import torch

    from edgemerge.runtime.kernel import apply_mask_reference
    from edgemerge.runtime.torch_backend import apply_mask_torch
    from edgemerge.runtime.triton_kernel import BLOCK, apply_mask_triton

    rows = []
    for n, dtype in cases:
        g = torch.Generator(device="cuda").manual_seed(n)
        base = torch.randn(n, device="cuda", generator=g).to(getattr(torch, dtype))
        vec = (torch.randn(n, device="cuda", generator=g) * 1e-3).to(getattr(torch, dtype))
        packed = torch.randint(0, 256, ((n + 7) // 8,), device="cuda", dtype=torch.uint8, generator=g)
        out_t, out_o, copy = torch.empty_like(base), torch.empty_like(base), torch.empty_like(base)
        t_copy = cuda_seconds(lambda: copy.copy_(base))
        t_tri = cuda_seconds(lambda: apply_mask_triton(base, vec, packed, out_t))
        t_ops = cuda_seconds(lambda: apply_mask_torch(base, vec, packed, out_o))
        same = torch.equal(out_t.view(torch.uint8), out_o.view(torch.uint8))
        if n <= 20_000_000:  # the numpy reference, on the host
            ref = apply_mask_reference(base.cpu().numpy(), vec.cpu().numpy(), packed.cpu().numpy())
            same = same and out_t.cpu().numpy().tobytes() == ref.tobytes()
        gbps = 2 * base.element_size() * n / t_copy / 1e9
        rows.append([f"{n / 1e6:.0f} M {dtype}", f"{1e3 * t_copy:.3f} ms ({gbps:.0f} GB/s)", f"{1e3 * t_tri:.3f} ms",
                     f"{t_tri / t_copy:.2f}×", f"{1e3 * t_ops:.3f} ms", f"{t_ops / t_copy:.2f}×",
                     "yes" if same else "**NO**"])
        print(rows[-1], flush=True)
        del base, vec, packed, out_t, out_o, copy
        torch.cuda.empty_cache()
    sweep = []
    n = 88_000_000
    base, vec = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    packed = torch.randint(0, 256, ((n + 7) // 8,), device="cuda", dtype=torch.uint8)
    out = torch.empty_like(base)
    t_copy = cuda_seconds(lambda: out.copy_(base))
    for block in (256, 512, 1024, 2048, 4096):
        t = cuda_seconds(lambda: apply_mask_triton(base, vec, packed, out, block=block))
        sweep.append(f"{block}{' (default)' if block == BLOCK else ''}: {t / t_copy:.2f}×")
    rows.append(["88 M, Triton block sweep", "", "; ".join(sweep), "", "", "", ""])
    return rows


def upload_rows(n: int = 88_000_000) -> list[list[str]]:
    import torch

    host_w = torch.randn(n).pin_memory()
    host_m = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8).pin_memory()
    dev_w, dev_m = torch.empty(n, device="cuda"), torch.empty((n + 7) // 8, device="cuda", dtype=torch.uint8)
    t_w = cuda_seconds(lambda: dev_w.copy_(host_w, non_blocking=True), reps=10)
    t_m = cuda_seconds(lambda: dev_m.copy_(host_m, non_blocking=True), reps=10)
    return [["host→device, fp32 weights of 88 M params (pinned)", f"{1e3 * t_w:.2f} ms", f"{4 * n / t_w / 1e9:.1f} GB/s"],
            ["host→device, packed mask of 88 M params (pinned)", f"{1e3 * t_m:.3f} ms", f"{t_w / t_m:.0f}× less time"]]


def model_rows(directory: str, n_tasks: int) -> list[list[str]]:
    import time

    import torch

    from edgemerge.pipeline import MergeConfig, merge
    from edgemerge.runtime import open_bundle
    from edgemerge.runtime.torch_backend import TorchTaskModel
    from vit import IMAGE, ViT

    base, tasks = make_vit_suite(directory, n_tasks)
    path = os.path.join(directory, "vit.safetensors")
    merge(MergeConfig(base, tasks, "task_arithmetic", private=("head.*",)), path)
    bundle = open_bundle(path)
    n_params = sum(p.numel for p in bundle.params if p.role == "merged")
    img = torch.randn(8, 3, IMAGE, IMAGE, device="cuda")
    rows = []
    plain = ViT().cuda().eval()
    plain.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in bundle.task_weights(bundle.tasks[1]).items()})
    with torch.inference_mode():
        want = plain(img)
        t_plain = cuda_seconds(lambda: plain(img), reps=20)
    src = torch.empty(n_params, device="cuda")
    dst = torch.empty_like(src)
    t_copy = cuda_seconds(lambda: dst.copy_(src))
    rows.append([f"device copy of the merged weights ({n_params / 1e6:.1f} M params)", f"{1e3 * t_copy:.3f} ms", "reference"])
    for kernel in ("triton", "torch"):
        tm = TorchTaskModel(bundle, ViT().cuda(), kernel=kernel)
        switches = []
        for _ in range(5):
            for t in bundle.tasks:
                switches.append(tm.switch(t))
        s = float(np.median(switches[len(bundle.tasks):]))
        tm.switch(bundle.tasks[1])
        with torch.inference_mode():
            got = tm(img)
            t_inf = cuda_seconds(lambda: tm(img), reps=20)
        err = float((got - want).abs().max())
        t0 = time.perf_counter()
        tm.switch(bundle.tasks[2])
        tm(img)
        torch.cuda.synchronize()
        t_first = time.perf_counter() - t0
        rows.append([f"`TorchTaskModel.switch`, kernel {kernel!r}, p50", f"{1e3 * s:.3f} ms",
                     f"{s / t_copy:.2f}× the copy end to end (goal ≤ 3×); resident {tm.resident_bytes() / 2**20:.0f} MiB"])
        rows.append([f"inference after switch, kernel {kernel!r} (batch 8)", f"{1e3 * t_inf:.2f} ms",
                     f"{t_inf / t_plain:.2f}× plain model; max abs diff vs plain {err:.1e}; switch + first run {1e3 * t_first:.1f} ms"])
        del tm
        torch.cuda.empty_cache()
    rows.append(["inference, plain model with θ_t loaded (batch 8)", f"{1e3 * t_plain:.2f} ms", "reference"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="12000000:float32,88000000:float32,350000000:float32,88000000:float16",
                    help="params:dtype pairs for the kernel table")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU")
    card = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, Triton {triton.__version__})"
    print(card, flush=True)
    k = table(["params, dtype", "device copy", "Triton fused", "÷ copy", "torch ops", "÷ copy", "bit-identical"],
              kernel_rows([(int(c.split(":")[0]), c.split(":")[1]) for c in args.cases.split(",")]))
    print(k, flush=True)
    u = table(["transfer", "time", "note"], upload_rows())
    print(u, flush=True)
    directory = tempfile.mkdtemp(prefix="edgemerge-gpu-")
    try:
        m = table(["measure", "value", "note"], model_rows(directory, args.tasks))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(m)
    if not args.no_write:
        write_section("Task switching on a GPU (issue 7)",
                      f"`bash bench/gpu_check.sh` (runs `bench/gpu_switch_bench.py`) — commit {git_rev()}.\n\n"
                      f"GPU: {card}. Host: {machine()}.\n\nThe mask kernel alone (θ0 and τ in the dtype shown, median of 50 CUDA-event timings after 10 warm-ups; goal ≤ 1.5× the copy). A copy moves 2 × 4 bytes per fp32 parameter, the fused pass 4 + 4 + 4 + 1/8 "
                      "(θ0, τ, θ_t, mask): its floor is 1.52× the copy (fp16: 1.53×), so the Triton kernel runs at the "
                      "bandwidth floor at 88 M and 350 M; at 12 M (48 MB, about the L2 size) the copy gains more from the cache.\n\n"
                      f"{k}\n\nUploading weights vs masks:\n\n{u}\n\nEnd to end, ViT-B-sized model, {args.tasks} tasks:\n\n{m}")


if __name__ == "__main__":
    main()
