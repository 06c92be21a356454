"""Kernels for the engine (paged attention), roofline probes; torch reference versions for CPU.

The engine imports attention (and the fused elementwise ops around its matmuls: :func:`add_rms_norm`,
:func:`silu_mul`, :func:`rotate`) from here, never from a file below: this is the seam. On CUDA the step's
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
import torch.nn.functional as F

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


def _import_triton(name: str) -> ModuleType:
    """``phaselens.kernels.<name>``, a Triton module; a clear error where Triton is not installed."""
    try:
        return importlib.import_module(f"phaselens.kernels.{name}")
    except ImportError as e:  # torch's CUDA wheels ship triton; a build without it cannot run the kernels
        raise RuntimeError(f"CUDA steps need Triton ({e}); install triton or select the torch reference "
                           "with phaselens.kernels.set_cuda_attention_backend('torch')") from e


@functools.cache
def _triton_kernels() -> ModuleType:
    mod = _import_triton("paged_attention")
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


@functools.cache
def _fused() -> ModuleType:
    return _import_triton("fused")


def add_rms_norm(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: ``(rms_norm(residual + delta) * weight, residual + delta)``.

    One Triton kernel on CUDA (kernels/fused.py), two torch calls elsewhere."""
    if uses_triton(delta.device):
        return _fused().add_rms_norm(delta, residual, weight, eps)
    s = residual + delta
    return F.rms_norm(s, weight.shape, weight, eps), s


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` of the fused ``[T, 2 * inter]`` gate/up projection (gate first)."""
    if uses_triton(gate_up.device):
        return _fused().silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [T, heads, head_dim]`` in HF's ``rotate_half`` layout, with a signed sin table
    (``rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin)``): ``x * cos + cat(x2, x1) * sin``."""
    if uses_triton(x.device):
        return _fused().rotate(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


if importlib.util.find_spec("triton") is not None:
    # loaded now where Triton is installed: the first import of a submodule binds its name on the package,
    # and the seam's function below must be what `from phaselens.kernels import paged_attention` gives
    importlib.import_module("phaselens.kernels.paged_attention")

#: the seam's name (``from phaselens.kernels import paged_attention`` is the function, not the submodule)
paged_attention = _paged_attention
