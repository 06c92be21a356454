"""Triton kernels that fuse the elementwise work around the matmuls of a Llama layer (CUDA only).

An 8B decode step at batch 1 is ~500 kernels, ~15 per layer, and half of them are elementwise ops of a few
microseconds each; in a CUDA graph every kernel boundary still costs its ramp and tail, which is why the step
ran at 0.65 of the DRAM peak although its matmuls stream the weights near 0.8 (bench/RESULTS.md, issue 7).
These three kernels replace eight per layer, as vLLM's ``fused_add_rms_norm``, ``silu_and_mul`` and rotary
kernels do:

- :func:`add_rms_norm`: the residual add and the next RMSNorm (two kernels, twice a layer);
- :func:`silu_mul`: SwiGLU's ``silu(gate) * up`` over the fused gate/up projection (two kernels);
- :func:`rotate`: RoPE of q and k together in the ``rotate_half`` layout (three kernels: mul, cat, addcmul).

Each rounds where its torch reference (phaselens.kernels) rounds, so the two agree to bf16 rounding of a
float32 sum's order (tests/kernels/test_gpu_fused.py). The references stay for the CPU and for A/B runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(delta_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         stride_d, stride_r, stride_o, stride_ro, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0)
    r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    # the residual stream is stored in the model's dtype: round the sum, as ``residual + delta`` does
    s = (r.to(tl.float32) + d.to(tl.float32)).to(r.dtype)
    tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
    x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # F.rms_norm: normalised and weighted in float32, rounded once
    tl.store(out_ptr + row * stride_o + cols, (x * rstd * w).to(r.dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    # F.silu rounds its output to the dtype; the product rounds again
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                   HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    x = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(x + i).to(tl.float32)
    x2 = tl.load(x + HALF + i).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + i).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + i).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + i).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # x * cos rounds; addcmul adds rotate_half(x) * sin in float32 and rounds once (the table's sin is
    # signed: rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin))
    o = out_ptr + t * stride_ot + h * stride_oh
    tl.store(o + i, ((x1 * c1).to(dtype).to(tl.float32) + x2 * s1).to(dtype))
    tl.store(o + HALF + i, ((x2 * c2).to(dtype).to(tl.float32) + x1 * s2).to(dtype))


def add_rms_norm(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + delta) * weight, residual + delta)`` of ``[T, hidden]`` rows, one kernel."""
    t, n = residual.shape
    if delta.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("add_rms_norm needs rows with unit column stride")
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    if t:
        _add_rms_norm_kernel[(t,)](delta, residual, weight, out, res_out, n, eps, delta.stride(0),
                                   residual.stride(0), out.stride(0), res_out.stride(0),
                                   BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out, res_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[T, 2 * inter]`` rows (gate first), one kernel."""
    t, two_n = gate_up.shape
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_mul needs rows with unit column stride")
    n = two_n // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if t:
        grid = (t, triton.cdiv(n, block))
        _silu_mul_kernel[grid](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, head_dim]`` (any row and head strides) rotated by ``cos``/``sin [T, 1, head_dim]``;
    a new contiguous tensor, one kernel."""
    t, heads, dim = x.shape
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        raise ValueError("rotate needs unit-stride head dimensions and cos/sin tables of one layout")
    out = torch.empty(t, heads, dim, dtype=x.dtype, device=x.device)
    if t:
        _rotate_kernel[(t, heads)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0),
                                   out.stride(1), HALF=dim // 2, num_warps=1)
    return out


def compiled_variants() -> int:
    """How many specializations of this module's kernels Triton has compiled in this process."""
    from phaselens.kernels.paged_attention import kernel_variants

    return kernel_variants(_add_rms_norm_kernel, _silu_mul_kernel, _rotate_kernel)
