"""Target devices as data. Every figure carries its source; figures marked "typical" are
estimates for a common setup, not vendor specifications -- override them with your own.

Memory bandwidth is the peak of the DRAM interface from the module data sheet; real kernels get
a fraction of it, which ``edgemerge.devices.plan`` accounts for with an efficiency measured on
the host. Storage speeds are typical sequential reads of the named media.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, unknown_name

# sequential read, bytes/s (typical; the medium's interface limit is higher for NVMe)
STORAGE_READ = {
    "microsd": 90e6,      # UHS-I card, typical (interface limit 104 MB/s)
    "emmc": 300e6,        # eMMC 5.1, typical (interface limit 400 MB/s)
    "nvme_gen3": 2.5e9,   # PCIe Gen3 x4 SSD, typical
    "nvme_gen4": 5.0e9,   # PCIe Gen4 x4 SSD, typical
}
STORAGE_SOURCE = "typical sequential reads of common media (JEDEC eMMC 5.1 / SD UHS-I / NVMe interface limits as upper bounds)"

# JetPack -> TensorRT shipped with it (NVIDIA JetPack release notes)
JETPACK_TENSORRT = {"4.6": "8.2.1", "5.1": "8.5.2", "6.0": "8.6.2", "6.1": "10.3", "6.2": "10.3", "7.0": "10.13"}
JETPACK_SOURCE = "NVIDIA JetPack release notes (developer.nvidia.com/embedded/jetpack-archive)"


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    ram_bytes: int
    os_reserved_bytes: int          # typical: what the OS and a headless JetPack/PetaLinux keep
    bandwidth: float                # bytes/s, peak DRAM
    storage: tuple[str, ...]        # keys of STORAGE_READ, first = default
    jetpack: tuple[str, ...] = ()   # supported JetPack releases (Jetson only)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def tensorrt(self) -> dict[str, str]:
        return {jp: JETPACK_TENSORRT[jp] for jp in self.jetpack}


GiB = 1 << 30
_JETSON_SHEET = "NVIDIA Jetson module data sheet / product page (developer.nvidia.com/embedded/jetson-modules)"
_OS_TYPICAL = "typical: headless JetPack (L4T) after boot, ~1 GiB; desktop images keep ~1.5-2 GiB"

DEVICES: dict[str, Device] = {
    "jetson-nano-4gb": Device(
        "jetson-nano-4gb", "Jetson Nano 4 GB", 4 * GiB, 1 * GiB, 25.6e9, ("microsd", "emmc"), ("4.6",),
        {"ram, bandwidth": _JETSON_SHEET + ": 4 GB 64-bit LPDDR4, 25.6 GB/s", "os": _OS_TYPICAL,
         "jetpack": "Jetson Nano is supported up to JetPack 4.6.x (TensorRT 8.2)"}),
    "xavier-nx": Device(
        "xavier-nx", "Jetson Xavier NX 8 GB", 8 * GiB, 1 * GiB, 59.7e9, ("emmc", "nvme_gen3"), ("5.1",),
        {"ram, bandwidth": _JETSON_SHEET + ": 8 GB 128-bit LPDDR4x, 59.7 GB/s", "os": _OS_TYPICAL,
         "jetpack": "Xavier is supported up to JetPack 5.1.x"}),
    "orin-nano-8gb": Device(
        "orin-nano-8gb", "Jetson Orin Nano 8 GB", 8 * GiB, 1 * GiB, 68e9, ("nvme_gen3", "microsd"), ("5.1", "6.0", "6.1", "6.2"),
        {"ram, bandwidth": _JETSON_SHEET + ": 8 GB 128-bit LPDDR5, 68 GB/s (102 GB/s in the JetPack 6.2 'Super' mode)",
         "os": _OS_TYPICAL}),
    "orin-nx-16gb": Device(
        "orin-nx-16gb", "Jetson Orin NX 16 GB", 16 * GiB, 1 * GiB, 102.4e9, ("nvme_gen3",), ("5.1", "6.0", "6.1", "6.2"),
        {"ram, bandwidth": _JETSON_SHEET + ": 16 GB 128-bit LPDDR5, 102.4 GB/s", "os": _OS_TYPICAL}),
    "agx-orin-64gb": Device(
        "agx-orin-64gb", "Jetson AGX Orin 64 GB", 64 * GiB, 1 * GiB, 204.8e9, ("emmc", "nvme_gen4"), ("5.1", "6.0", "6.1", "6.2"),
        {"ram, bandwidth": _JETSON_SHEET + ": 64 GB 256-bit LPDDR5, 204.8 GB/s; 64 GB eMMC 5.1", "os": _OS_TYPICAL}),
    "agx-thor": Device(
        "agx-thor", "Jetson AGX Thor (T5000)", 128 * GiB, 2 * GiB, 273e9, ("nvme_gen4",), ("7.0",),
        {"ram, bandwidth": "NVIDIA Jetson Thor product page: 128 GB 256-bit LPDDR5X, 273 GB/s", "os": "typical: ~2 GiB"}),
    "zcu102": Device(
        "zcu102", "AMD/Xilinx ZCU102 (Zynq UltraScale+ MPSoC)", 4 * GiB, 512 << 20, 21.3e9, ("microsd",), (),
        {"ram, bandwidth": "AMD UG1182 (ZCU102 board user guide): PS 4 GB 64-bit DDR4-2666 SODIMM -> 21.3 GB/s peak",
         "os": "typical: PetaLinux minimal image ~0.5 GiB"}),
    "zcu104": Device(
        "zcu104", "AMD/Xilinx ZCU104 (Zynq UltraScale+ MPSoC)", 2 * GiB, 512 << 20, 19.2e9, ("microsd",), (),
        {"ram, bandwidth": "AMD UG1267 (ZCU104 board user guide): PS 2 GB 64-bit DDR4-2400 -> 19.2 GB/s peak",
         "os": "typical: PetaLinux minimal image ~0.5 GiB"}),
}


def get_device(name: str) -> Device:
    try:
        return DEVICES[name]
    except KeyError:
        raise ConfigError(unknown_name("device", name, list(DEVICES))) from None
