"""``edgemerge plan``: will a bundle fit on a device, and how fast will it start and switch?

These are projections from data-sheet figures, not measurements on the device:

- resident memory = bundle data touched (θ0, τ_MTL, one task's masks and head) + the engine's
  weight buffers (one model; ``sessions`` mode keeps N) + activations (``activation_bytes``);
  it fits when that is at most RAM − what the OS keeps.
- cold start = bytes read for the first task ÷ the storage's sequential read speed; a *cold
  switch* (page cache dropped, e.g. after memory pressure) reads the same bytes again -- θ0,
  τ_MTL, the task's masks and head: about 2× one checkpoint for TALL -- and then runs the kernel.
  Switches stay warm only while those bytes stay resident (``warm_ram_bytes``, with the engine's
  weights); the RAM row says whether they fit.
- our switch = bytes the mask kernel touches (reads θ0 and τ, 1/8 byte of mask per parameter,
  writes θ_t) ÷ (peak DRAM bandwidth × efficiency), where efficiency is what the same kernel
  achieves on this host relative to this host's own memcpy bandwidth (``measure_efficiency``).
- the alternative, loading that task's separate model = its bytes ÷ storage read speed
  (a cold read: an 8 GB device cannot keep N models in its page cache).

The efficiency is measured on this host only when the host is the device's architecture (every
profile is 64-bit ARM); from an x86 host it is not transferable -- the ARM build runs the scalar C
loop, not the AVX2 one -- and the switch is given as a range over ``UNMEASURED_EFFICIENCY``: from
the peak-bandwidth floor to 4× it. Run ``plan`` on the device, or pass ``--efficiency``, for one
number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..runtime.bundle import Bundle
from ..runtime.dtypes import DTYPES
from .profiles import STORAGE_READ, Device

RUNTIMES = ("inputs", "sessions")
DEVICE_ARCH = "aarch64"            # Jetson and Zynq UltraScale+ application cores alike
UNMEASURED_EFFICIENCY = (0.25, 1.0)  # assumed when nothing was measured on the device's architecture


@dataclass(frozen=True)
class Sizes:
    """What the projections need to know about a bundle, in bytes."""

    n_tasks: int
    base: int            # θ0, all params
    vector: int          # τ_MTL
    mask_one_task: int
    private_one_task: int  # the largest task's private tensors
    model: int           # θ_t as the engine holds it (θ0 dtypes)
    merged_numel: int
    kernel_touch: int    # bytes the mask kernel reads and writes for one switch
    separate_model: int  # one task's own checkpoint (source dtype, with its head)


def sizes(bundle: Bundle) -> Sizes:
    h = bundle.header
    nbytes = lambda name: h.tensors[name].end - h.tensors[name].start  # noqa: E731
    merged = [p for p in bundle.params if p.role == "merged"]
    base = sum(nbytes(f"base/{p.name}") for p in bundle.params)
    vector = sum(nbytes(f"vector/{p.name}") for p in merged)
    t0 = bundle.tasks[0]
    masks = sum(nbytes(f"mask/{t0}/{p.name}") for p in merged) if bundle.mask_policy == "tall" else 0
    private = max(sum(nbytes(f"task/{t}/{k}") for k in keys) for t, keys in bundle.private_keys.items())
    vsize = DTYPES[bundle.vector_dtype].itemsize
    touch = sum(p.numel * (2 * DTYPES[p.dtype].itemsize + vsize) + (p.numel + 7) // 8 for p in merged)
    return Sizes(len(bundle.tasks), base, vector, masks, private, base, sum(p.numel for p in merged), touch, base + private)


def measure_efficiency(numel: int = 1 << 24, repeat: int = 5) -> float:
    """(bytes the mask kernel moves per second) ÷ (memcpy bytes moved per second), on this host."""
    from ..measure import best_of
    from ..runtime.bits import pack_bits
    from ..runtime.kernel import apply_mask

    rng = np.random.default_rng(0)
    base, vec = rng.standard_normal(numel, dtype=np.float32), rng.standard_normal(numel, dtype=np.float32)
    packed, out = pack_bits(rng.random(numel) < 0.3), np.empty(numel, np.float32)

    t_copy = best_of(lambda: np.copyto(out, base), repeat)
    t_kernel = best_of(lambda: apply_mask(base, vec, packed, out), repeat)
    copy_rate = 2 * 4 * numel / t_copy                    # read + write
    kernel_rate = (3 * 4 * numel + numel // 8) / t_kernel  # read θ0, τ, mask; write θ_t
    return min(1.0, kernel_rate / copy_rate)


def project(s: Sizes, device: Device, runtime: str = "inputs", storage: str | None = None,
            efficiency: float | tuple[float, float] = 1.0, activation_bytes: int = 0) -> dict[str, Any]:
    """The projections (docs above); every number is plain arithmetic on ``s`` and ``device``.
    ``efficiency``: one value, or a (low, high) range -- the switch time then is a range and the
    single figures (``switch_s``, ``speedup``) take its slow end."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    storage = storage or device.storage[0]
    if storage not in STORAGE_READ:
        raise ConfigError(f"unknown storage {storage!r}; valid: {', '.join(STORAGE_READ)}")
    low, high = (efficiency, efficiency) if isinstance(efficiency, (int, float)) else efficiency
    if not 0 < low <= high <= 1:
        raise ConfigError("efficiency must be in (0, 1] (a range: low <= high)")
    read = STORAGE_READ[storage]
    touched = s.base + s.vector + s.mask_one_task + s.private_one_task
    engines = s.model * (s.n_tasks if runtime == "sessions" else 1)
    resident = touched + engines + activation_bytes
    available = device.ram_bytes - device.os_reserved_bytes
    switch = s.kernel_touch / (device.bandwidth * low)
    load = s.separate_model / read
    return {
        "device": device.name, "runtime": runtime, "storage": storage,
        "available_bytes": available, "resident_bytes": resident, "fits": resident <= available,
        "separate_resident_bytes": s.separate_model + activation_bytes,
        "bundle_storage_bytes": s.base + s.vector + s.n_tasks * (s.mask_one_task + s.private_one_task),
        "separate_storage_bytes": s.n_tasks * s.separate_model,
        "cold_start_s": touched / read,
        # a switch from a cold page cache reads θ0, τ_MTL, the task's masks and head from storage
        # before the kernel runs; warm, it reads nothing (all of it resident: warm_ram_bytes)
        "cold_switch_read_bytes": touched, "cold_switch_s": touched / read + switch,
        "cold_read_vs_checkpoint": touched / s.separate_model if s.separate_model else float("nan"),
        "warm_ram_bytes": touched + engines,
        "switch_s": switch, "switch_s_range": [s.kernel_touch / (device.bandwidth * high), switch],
        "separate_load_s": load, "speedup": load / switch,
        "efficiency": efficiency, "kernel_bytes": s.kernel_touch,
        # what the resident figure is made of: the bundle's θ0, τ_MTL and one task's masks and head
        # stay mapped for warm switches; the engine holds θ_t (N copies in sessions mode)
        "resident_parts": {"bundle data a switch reads": touched, "engine weights": engines, "activations": activation_bytes},
    }
