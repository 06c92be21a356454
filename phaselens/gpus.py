"""GPU spec table: peak dense bf16 FLOP/s and DRAM bandwidth, keyed by the NVML device name.

Figures are the vendors' datasheet numbers (dense, no sparsity). They are the defaults for MFU/MBU;
the roofline probe (`phaselens probe`, kernels/roofline.py) measures the node's own and overrides them.
Unknown GPUs are reported as unknown, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    """Peak rates of one GPU model."""

    name: str
    peak_bf16_flops: float
    peak_dram_bytes_per_s: float
    memory_bytes: int
    source: str = "datasheet"


GiB = 1024**3

# NVIDIA datasheets: H100 SXM5 (989 TFLOP/s dense bf16, 3.35 TB/s HBM3), H100 PCIe (756, 2.0 TB/s),
# H100 NVL (835, 3.9 TB/s), H200 SXM (989, 4.8 TB/s), A100 SXM 80GB (312, 2.039 TB/s),
# A100 40GB (312, 1.555 TB/s), L40S (362 dense bf16, 864 GB/s), L4 (121, 300 GB/s), A10 (125, 600 GB/s).
_SPECS = [
    GpuSpec("NVIDIA H100 80GB HBM3", 9.89e14, 3.35e12, 80 * GiB),
    GpuSpec("NVIDIA H100 PCIe", 7.56e14, 2.0e12, 80 * GiB),
    GpuSpec("NVIDIA H100 NVL", 8.35e14, 3.9e12, 94 * GiB),
    GpuSpec("NVIDIA H200", 9.89e14, 4.8e12, 141 * GiB),
    GpuSpec("NVIDIA A100-SXM4-80GB", 3.12e14, 2.039e12, 80 * GiB),
    GpuSpec("NVIDIA A100-SXM4-40GB", 3.12e14, 1.555e12, 40 * GiB),
    GpuSpec("NVIDIA A100 80GB PCIe", 3.12e14, 1.935e12, 80 * GiB),
    GpuSpec("NVIDIA L40S", 3.62e14, 8.64e11, 48 * GiB),
    GpuSpec("NVIDIA L4", 1.21e14, 3.0e11, 24 * GiB),
    GpuSpec("NVIDIA A10", 1.25e14, 6.0e11, 24 * GiB),
]
GPU_SPECS: dict[str, GpuSpec] = {s.name: s for s in _SPECS}


class UnknownGpuError(KeyError):
    """No spec is known for this GPU name."""

    def __str__(self) -> str:
        known = ", ".join(sorted(GPU_SPECS))
        return f"unknown GPU {self.args[0]!r}: no peak figures known (known: {known}); run `phaselens probe`"


def gpu_spec(name: str) -> GpuSpec:
    """Spec for an NVML device name; exact match first, then case-insensitive. Raises UnknownGpuError."""
    if name in GPU_SPECS:
        return GPU_SPECS[name]
    folded = {k.lower(): v for k, v in GPU_SPECS.items()}
    spec = folded.get(name.strip().lower())
    if spec is None:
        raise UnknownGpuError(name)
    return spec


def find_gpu_spec(name: str) -> GpuSpec | None:
    """Like :func:`gpu_spec` but returns None for an unknown GPU."""
    try:
        return gpu_spec(name)
    except UnknownGpuError:
        return None
