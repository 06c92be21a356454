"""NVML set-up shared by the GPM and NVML samplers: init, enumerate GPUs by UUID, classify errors."""

from __future__ import annotations

from typing import Any

from phaselens.agent.samplers.base import SampledGpu

#: NVML errors that mean the GPU is gone (or unusable) rather than a field being unsupported.
_LOST_ERRORS = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_UNKNOWN", "NVML_ERROR_DRIVER_NOT_LOADED",
                "NVML_ERROR_NOT_FOUND", "NVML_ERROR_UNINITIALIZED")
_UNSUPPORTED_ERRORS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION",
                       "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT")


def load_nvml(nvml: Any | None) -> Any:
    """The pynvml module (nvidia-ml-py), or the seam tests pass in."""
    if nvml is not None:
        return nvml
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def enumerate_gpus(nvml: Any) -> list[SampledGpu]:
    """Every GPU NVML sees, with its UUID and name (nvmlInit must have been called)."""
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        gpus.append(SampledGpu(uuid=_text(nvml.nvmlDeviceGetUUID(handle)), index=i,
                               name=_text(nvml.nvmlDeviceGetName(handle)), handle=handle))
    return gpus


_CODES: dict[int, dict[int, str]] = {}


def error_code(nvml: Any, exc: Exception) -> str:
    """The NVML_ERROR_* constant name of an NVMLError ('' when unknown)."""
    codes = _CODES.get(id(nvml))
    if codes is None:
        codes = _CODES[id(nvml)] = {getattr(nvml, n): n for n in dir(nvml)
                                    if n.startswith("NVML_ERROR_") and isinstance(getattr(nvml, n), int)}
    value = getattr(exc, "value", None)
    return codes.get(value, "") if isinstance(value, int) else ""


def is_lost(nvml: Any, exc: Exception) -> bool:
    return error_code(nvml, exc) in _LOST_ERRORS


def is_unsupported(nvml: Any, exc: Exception) -> bool:
    return error_code(nvml, exc) in _UNSUPPORTED_ERRORS
