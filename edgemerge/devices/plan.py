"""``edgemerge plan``: will a bundle fit on a device, and how fast will it start and switch?

These are projections from data-sheet figures, not measurements on the device:

- resident memory = bundle data touched (θ0, τ_MTL, one task's masks and head) + the engine's
  weight buffers (one model; ``sessions`` mode keeps N) + activations (``activation_bytes``);
  it fits when that is at most RAM − what the OS keeps.
- cold start = bytes read for the first task ÷ the storage's sequential read speed; a *cold
  switch* (page cache dropped, e.g. after memory pressure) reads the same bytes again -- θ0,
  τ_MTL, the task's masks and head: about 2× one checkpoint for TALL; θ0 + the task's own
  compressed bits and head for a codec without a shared vector (tswitch, delta) -- and then runs
  the kernel. Format v2 tasks differ; the figures are those of the task whose switch reads most.
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
from ..inspect import codec_bytes
from ..runtime.bundle import Bundle
from ..runtime.codecs import code_nbytes, dcodes_name, planes_layout, planes_name
from ..runtime.dtypes import DTYPES
from .profiles import STORAGE_READ, Device

RUNTIMES = ("inputs", "sessions")
DEVICE_ARCH = "aarch64"            # Jetson and Zynq UltraScale+ application cores alike
UNMEASURED_EFFICIENCY = (0.25, 1.0)  # assumed when nothing was measured on the device's architecture


@dataclass(frozen=True)
class Sizes:
    """What the projections need to know about a bundle, in bytes. Per-task figures are those of
    the task whose switch reads the most (format v2 tasks differ: a tswitch task reads no τ_MTL)."""

    n_tasks: int
    base: int            # θ0, all params
    vector: int          # shared vectors stored: τ_MTL and EMR's elected vector (0 when no task reads one)
    mask_one_task: int   # that task's own codec data as stored (TALL masks, planes, δ, scales, fixes)
    private_one_task: int  # that task's private tensors
    model: int           # θ_t as the engine holds it (θ0 dtypes)
    merged_numel: int
    kernel_touch: int    # bytes the rebuild reads and writes for one switch (the most of any task)
    separate_model: int  # one task's own checkpoint (source dtype, with its head)
    reads_vector: bool = True   # that task's switch reads a shared vector (τ_MTL or the elected one)
    codec_bytes: int = -1       # all tasks' codec data (−1: n_tasks × mask_one_task, v1)
    private_bytes: int = -1     # all tasks' private tensors (−1: n_tasks × private_one_task)
    vector_read: int = -1       # the shared vector that task reads (−1: all of ``vector`` when reads_vector)
    held_one_task: int = -1     # the most codec data any task holds in RAM once decoded (xz planes and codes are
                                # decoded at first use into full-length planes, int64 fix positions, raw codes;
                                # −1: as stored, ``mask_one_task``)


def sizes(bundle: Bundle) -> Sizes:
    h = bundle.header
    nbytes = lambda name: h.tensors[name].end - h.tensors[name].start  # noqa: E731
    merged = bundle.merged
    base = sum(nbytes(f"base/{p.name}") for p in bundle.params)
    vector = sum(nbytes(f"vector/{p.name}") for p in merged) if bundle.shared else 0
    elected = sum(nbytes(f"elected/{p.name}") for p in merged) if bundle.elected else 0
    own = codec_bytes(bundle)
    private = {t: sum(nbytes(f"task/{t}/{k}") for k in bundle.private_keys[t]) for t in bundle.tasks}
    shared = {t: vector if bundle.codecs[t].shared else elected if bundle.codecs[t].name == "emr" else 0 for t in bundle.tasks}
    reads = {t: own[t] + private[t] + shared[t] for t in bundle.tasks}
    worst = max(bundle.tasks, key=lambda t: reads[t])
    numel = sum(p.numel for p in merged)
    item = sum(p.numel * DTYPES[p.dtype].itemsize for p in merged)
    planes = sum((p.numel + 7) // 8 for p in merged)

    def touch(t: str) -> int:  # θ0 read + θ_t written, plus what the task's rule reads per element
        c = bundle.codecs[t]
        per = {"tall": lambda: DTYPES[bundle.vector_dtype].itemsize * numel + planes,
               "emr": lambda: DTYPES[bundle.vector_dtype].itemsize * numel + planes,
               "tswitch": lambda: 2 * planes,
               "delta": lambda: (numel + 1) // 2 if c.dtype == "I4" else numel * DTYPES["I8" if c.dtype == "I8" else c.dtype].itemsize}
        return 2 * item + per[c.name]()

    def held(t: str) -> int:  # the stored planes / codes stream replaced by what it decodes to
        c = bundle.codecs[t]
        out = own[t]
        if c.uses_planes_tensor:
            layout = planes_layout(c, [p.numel for p in merged]).split()
            out += planes * (("presence" in layout) + ("signs" in layout)) + 8 * c.correction - nbytes(planes_name(t))
        if c.uses_codes_tensor:
            out += sum(code_nbytes(c.dtype, p.numel) for p in merged) - nbytes(dcodes_name(t))
        return out

    return Sizes(len(bundle.tasks), base, vector + elected, own[worst], private[worst], base, numel,
                 max(touch(t) for t in bundle.tasks), base + private[worst], shared[worst] > 0,
                 sum(own.values()), sum(private.values()), shared[worst], max(held(t) for t in bundle.tasks))


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
    vec = (s.vector_read if s.vector_read >= 0 else s.vector) if s.reads_vector else 0
    touched = s.base + vec + s.mask_one_task + s.private_one_task
    held = touched - s.mask_one_task + (s.held_one_task if s.held_one_task >= 0 else s.mask_one_task)
    engines = s.model * (s.n_tasks if runtime == "sessions" else 1)
    resident = held + engines + activation_bytes
    available = device.ram_bytes - device.os_reserved_bytes
    switch = s.kernel_touch / (device.bandwidth * low)
    load = s.separate_model / read
    return {
        "device": device.name, "runtime": runtime, "storage": storage,
        "available_bytes": available, "resident_bytes": resident, "fits": resident <= available,
        "separate_resident_bytes": s.separate_model + activation_bytes,
        "bundle_storage_bytes": s.base + s.vector + (s.codec_bytes if s.codec_bytes >= 0 else s.n_tasks * s.mask_one_task)
        + (s.private_bytes if s.private_bytes >= 0 else s.n_tasks * s.private_one_task),
        "separate_storage_bytes": s.n_tasks * s.separate_model,
        "cold_start_s": touched / read,
        # a switch from a cold page cache reads θ0, τ_MTL, the task's masks and head from storage
        # before the kernel runs; warm, it reads nothing (all of it resident: warm_ram_bytes)
        "cold_switch_read_bytes": touched, "cold_switch_s": touched / read + switch,
        "cold_read_vs_checkpoint": touched / s.separate_model if s.separate_model else float("nan"),
        "warm_ram_bytes": held + engines,
        "switch_s": switch, "switch_s_range": [s.kernel_touch / (device.bandwidth * high), switch],
        "separate_load_s": load, "speedup": load / switch,
        "efficiency": efficiency, "kernel_bytes": s.kernel_touch,
        # what the resident figure is made of: the bundle's θ0, τ_MTL and one task's masks and head
        # stay mapped for warm switches; the engine holds θ_t (N copies in sessions mode)
        "resident_parts": {"bundle data a switch holds": held, "engine weights": engines,
                           "activations": activation_bytes},
    }
