"""The fused elementwise kernels (kernels/fused.py) against their torch references (phaselens.kernels with
the "torch" backend) on the GPU in bf16: random row counts, strided inputs as the model passes them (q and k
as a view of the fused qkv projection), and the whole 8B-shaped layer sizes.

Both round where the reference rounds; they differ only by a float32 sum's order, so most elements agree to
the bit and the rest by one bf16 unit.
"""

from __future__ import annotations

import pytest
import torch

from phaselens import kernels

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda:0")
#: one bf16 unit: 8 significant bits, so a rounding step is at most 2^-7 of the value
ULP = 2.0 ** -7


def _reference(fn, *args):
    previous = kernels.set_cuda_attention_backend("torch")
    try:
        return fn(*args)
    finally:
        kernels.set_cuda_attention_backend(previous)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    diff = (a.float() - b.float()).abs()
    bound = b.float().abs() * ULP + 1e-6
    assert bool((diff <= bound).all()), float((diff / bound).max())  # at most one rounding step apart
    assert float((diff == 0).float().mean()) > 0.9  # most elements to the bit


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA")


@pytest.mark.parametrize("rows", [1, 3, 64, 517])
def test_add_rms_norm_matches_reference(rows: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    delta = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16, generator=g)
    residual = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16, generator=g) * 2
    weight = 1 + 0.1 * torch.randn(4096, device=DEVICE, dtype=torch.bfloat16, generator=g)
    out, res = kernels.add_rms_norm(delta, residual, weight, 1e-5)
    want_out, want_res = _reference(kernels.add_rms_norm, delta, residual, weight, 1e-5)
    assert torch.equal(res, want_res)  # one bf16 rounding of the same sum
    _close(out, want_out)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_silu_mul_matches_reference(rows: int) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 14336, device=DEVICE, dtype=torch.bfloat16, generator=g) * 3
    _close(kernels.silu_mul(gate_up), _reference(kernels.silu_mul, gate_up))


@pytest.mark.parametrize("rows", [1, 5, 256])
def test_rotate_of_a_qkv_view_matches_reference(rows: int) -> None:
    # q (32 heads) and k (8 heads) as the model passes them: a view of the fused [T, 48 * 128] projection
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    qkv = torch.randn(rows, 48 * 128, device=DEVICE, dtype=torch.bfloat16, generator=g)
    x = qkv[:, :40 * 128].view(rows, 40, 128)
    positions = torch.randint(0, 8192, (rows,), device=DEVICE, generator=g)
    angle = positions[:, None].float() / (10000 ** (torch.arange(0, 64, device=DEVICE).float() / 64))
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(torch.bfloat16).unsqueeze(1)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(torch.bfloat16).unsqueeze(1)
    got = kernels.rotate(x, cos, sin)
    assert got.is_contiguous()
    _close(got, _reference(kernels.rotate, x, cos, sin))
