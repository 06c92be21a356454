"""Kernels for the engine (paged attention), roofline probes; torch reference versions for CPU.

The engine imports attention from here, never from a file below: this is the seam. On CUDA the step's
attention runs the Triton kernels of the submodule ``phaselens.kernels.paged_attention`` (reach it with
:func:`importlib.import_module`: the package attribute of that name is the seam function below); on the
CPU, and on CUDA when :func:`set_cuda_attention_backend` says ``"torch"`` (tests, A/B benchmarks), the torch
reference of :mod:`phaselens.kernels.attention`. Triton is loaded only where it is installed, so CPU-only
installs need not have it; on CUDA without it the step fails with an error saying so (no silent fallback).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch

from phaselens.kernels import attention as _reference
from phaselens.kernels.attention import AttentionMetadata, dense_attention, write_kv  # noqa: F401

#: attention implementations selectable for CUDA tensors
CUDA_ATTENTION_BACKENDS = ("triton", "torch")
_cuda_backend = "triton"


def set_cuda_attention_backend(name: str) -> str:
    """Select the attention used for CUDA tensors (``"triton"`` or ``"torch"``); returns the previous one."""
    global _cuda_backend
    if name not in CUDA_ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(CUDA_ATTENTION_BACKENDS)}")
    previous, _cuda_backend = _cuda_backend, name
    return previous


def cuda_attention_backend() -> str:
    """The attention backend used for CUDA tensors now."""
    return _cuda_backend


@functools.cache
def _triton_kernels() -> ModuleType:
    try:
        mod = importlib.import_module("phaselens.kernels.paged_attention")
    except ImportError as e:  # torch's CUDA wheels ship triton; a build without it cannot run the kernels
        raise RuntimeError(f"CUDA attention needs Triton ({e}); install triton or select the torch "
                           "reference with phaselens.kernels.set_cuda_attention_backend('torch')") from e
    # importing the submodule rebinds the package's `paged_attention` to it: the seam keeps the name
    globals()["paged_attention"] = _paged_attention
    return mod


def uses_triton(device: torch.device) -> bool:
    """Whether steps on ``device`` run the Triton kernels."""
    return device.type == "cuda" and _cuda_backend == "triton"


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of one packed step, new K/V written to the cache first (see ``attention.paged_attention``).

    ``q [T, heads, hd]``, ``k``/``v [T, kv_heads, hd]`` -> ``[T, heads, hd]``.
    """
    if uses_triton(q.device):
        return _triton_kernels().paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    return _reference.paged_attention(q, k, v, k_cache, v_cache, meta, scale)


if importlib.util.find_spec("triton") is not None:
    # loaded now where Triton is installed: the first import of a submodule binds its name on the package,
    # and the seam's function below must be what `from phaselens.kernels import paged_attention` gives
    importlib.import_module("phaselens.kernels.paged_attention")

#: the seam's name (``from phaselens.kernels import paged_attention`` is the function, not the submodule)
paged_attention = _paged_attention
