"""The GPU UUID of a torch device: GPUs are named by UUID, never index (DESIGN.md, "Phases and clocks").

``CUDA_VISIBLE_DEVICES`` renumbers indices, so ``cuda:0`` in the engine may be NVML index 3 in the agent;
the UUID is the same on both sides. On CPU there is no GPU: the name is ``GPU-sim-<index>``, the id the
agent's simulated source uses for worker ``index``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _with_prefix(raw: str) -> str:
    raw = raw.strip()
    return raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"


def gpu_uuid_for(device: torch.device | str, index: int | None = None, *, nvml: Any = None) -> str:
    """``GPU-...`` UUID of ``device``; on CPU ``GPU-sim-<index>`` (``index`` defaults to 0).

    On CUDA the UUID comes from torch's device properties; where this torch build does not expose it, from
    NVML (``nvml``: the ``pynvml`` module, a seam for tests) by the device's PCI bus id. RuntimeError when
    neither can name the GPU: an invented name would break the join with the agent's samples.
    """
    device = torch.device(device)
    if device.type != "cuda":
        n = index if index is not None else (device.index or 0)
        return f"GPU-sim-{n}"
    ordinal = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(ordinal)
    uuid = getattr(props, "uuid", None)
    if uuid is not None and str(uuid):
        return _with_prefix(str(uuid))
    return _uuid_from_nvml(props, ordinal, nvml)


def _uuid_from_nvml(props: Any, ordinal: int, nvml: Any) -> str:
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:
        raise RuntimeError(f"cannot name cuda:{ordinal}: torch exposes neither its UUID nor its PCI bus id") \
            from None
    if nvml is None:
        import pynvml  # nvidia-ml-py; imported here so CPU-only use never needs the library

        nvml = pynvml
    try:
        nvml.nvmlInit()
        try:
            handle = nvml.nvmlDeviceGetHandleByPciBusId(bus)
            raw = nvml.nvmlDeviceGetUUID(handle)
        finally:
            nvml.nvmlShutdown()
    except Exception as exc:  # pynvml raises NVMLError subclasses; any failure means "cannot name it"
        raise RuntimeError(f"cannot name cuda:{ordinal} (PCI {bus}) through NVML: {exc}") from exc
    return _with_prefix(raw.decode() if isinstance(raw, bytes) else str(raw))
