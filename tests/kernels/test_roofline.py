"""The roofline probe measures, caches, and serves peaks; unknown GPUs stay unknown."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from phaselens.kernels.commands import probe as probe_cmd
from phaselens.kernels.roofline import RooflineCache, peaks_for, probe


def test_cpu_probe_gives_positive_finite_rates() -> None:
    result = probe("cpu", repeats=3)
    assert result.device_name == "cpu"
    assert 1e6 < result.matmul_flops_per_s < 1e14
    assert 1e6 < result.copy_bytes_per_s < 1e13


def test_cache_round_trip_and_peak_precedence(tmp_path) -> None:
    cache = RooflineCache(tmp_path / "r.json")
    assert peaks_for("NVIDIA H100 80GB HBM3", cache) == (9.89e14, 3.35e12, "datasheet")
    assert peaks_for("Voodoo 5", cache) is None
    measured = probe("cpu", repeats=3)
    fake = type(measured)(**{**measured.to_dict(), "device_name": "NVIDIA H100 80GB HBM3",
                             "matmul_flops_per_s": 7.9e14})
    cache.put(fake)
    assert peaks_for("NVIDIA H100 80GB HBM3", cache) == (7.9e14, fake.copy_bytes_per_s, "probe")


def test_corrupt_cache_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="unreadable roofline cache"):
        RooflineCache(path).load()


def test_cli_cpu_json_and_bad_device(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PHASELENS_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(probe_cmd, ["--device", "cpu", "--repeats", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["device_name"] == "cpu"
    assert (tmp_path / "roofline.json").exists()
    bad = runner.invoke(probe_cmd, ["--device", "tpu"])
    assert bad.exit_code == 2 and "'tpu'" in bad.output


def _direct_rate(fn, work: float, iters: int = 20) -> float:
    """Independent of the probe's timer: host clock around many calls, synchronized (gpt-fast style)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return work * iters / (time.perf_counter() - t0)


@pytest.mark.gpu
def test_gpu_probe_agrees_with_direct_torch_timing() -> None:
    """Acceptance (issue 7): the probe's figures within 15% of torch matmul and copy timed directly."""
    dev = torch.device("cuda")
    result = probe(dev, repeats=10)
    n = result.matmul_n
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    direct_flops = _direct_rate(lambda: a @ b, 2.0 * n**3)
    src = torch.rand(result.copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    direct_copy = _direct_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4)
    print(f"probe {result.matmul_flops_per_s / 1e12:.0f} TFLOP/s vs direct {direct_flops / 1e12:.0f}; "
          f"probe {result.copy_bytes_per_s / 1e9:.0f} GB/s vs direct {direct_copy / 1e9:.0f}")
    assert abs(result.matmul_flops_per_s / direct_flops - 1) < 0.15
    assert abs(result.copy_bytes_per_s / direct_copy - 1) < 0.15
