"""Roofline probes: the node's own bf16 matmul rate and device-memory bandwidth.

MFU and MBU divide a step's analytic FLOPs and bytes by a peak. Datasheet peaks (phaselens/gpus.py) are
what the vendor promises; the probe measures what this node delivers (clocks, power cap, HBM stack), the
way METHOD.md says: random data (zeros run faster), warm-up kept out, device events around the work,
the median of repeats, inputs larger than L2. Results are cached per GPU model name so that the agent can
use them as peaks without re-measuring (`phaselens probe` writes the cache).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from phaselens.gpus import find_gpu_spec

#: Sizes that fill an H100 (8192^3 bf16 matmul: 1.1 TFLOP; a 1 GiB copy is 20x its 50 MB L2) and that stay
#: quick on a CPU.
GPU_MATMUL_N = 8192
GPU_COPY_BYTES = 1 << 30
CPU_MATMUL_N = 512
CPU_COPY_BYTES = 64 << 20


@dataclass(frozen=True)
class RooflineResult:
    """One probe of one device."""

    device_name: str
    matmul_flops_per_s: float
    copy_bytes_per_s: float
    matmul_n: int
    matmul_dtype: str
    copy_bytes: int
    repeats: int
    measured_unix_s: float
    torch_version: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Timer:
    """Times a callable on a device: CUDA events on GPU, perf_counter on CPU (synchronized either way)."""

    def __init__(self, device: torch.device):
        self.device = device

    def median_seconds(self, fn: Callable[[], object], repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def measure_matmul(device: torch.device, n: int | None = None, repeats: int = 10, warmup: int = 3) -> float:
    """FLOP/s of an n x n x n matmul (bf16 on GPU, float32 on CPU), median over repeats.

    Three input sets are rotated so that no repeat finds its operands in a cache.
    """
    n = n or (GPU_MATMUL_N if device.type == "cuda" else CPU_MATMUL_N)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
             torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    state = {"i": 0}

    def run() -> None:
        a, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        torch.matmul(a, b, out=out)

    seconds = _Timer(device).median_seconds(run, repeats, warmup)
    return 2.0 * n**3 / seconds


def measure_copy(device: torch.device, nbytes: int | None = None, repeats: int = 10,
                 warmup: int = 3) -> float:
    """Device-memory bandwidth in bytes/s of a large copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES)
    numel = nbytes // 4
    src = torch.rand(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _Timer(device).median_seconds(lambda: dst.copy_(src), repeats, warmup)
    return 2.0 * numel * 4 / seconds


def device_name(device: torch.device) -> str:
    """The name NVML reports for a CUDA device (torch reports the same string); ``cpu`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def probe(device: torch.device | str = "cuda", repeats: int = 10) -> RooflineResult:
    """Measure the matmul rate and copy bandwidth of ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine; probe the CPU with --device cpu")
    n = GPU_MATMUL_N if device.type == "cuda" else CPU_MATMUL_N
    nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    return RooflineResult(
        device_name=device_name(device),
        matmul_flops_per_s=measure_matmul(device, n, repeats=repeats),
        copy_bytes_per_s=measure_copy(device, nbytes, repeats=repeats),
        matmul_n=n,
        matmul_dtype="bfloat16" if device.type == "cuda" else "float32",
        copy_bytes=nbytes,
        repeats=repeats,
        measured_unix_s=time.time(),
        torch_version=torch.__version__,
    )


def default_cache_path() -> Path:
    base = os.environ.get("PHASELENS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phaselens")
    return Path(base) / "roofline.json"


class RooflineCache:
    """Probe results by device name, in one JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path else default_cache_path()

    def load(self) -> dict[str, RooflineResult]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: unreadable roofline cache ({exc}); delete it and re-run "
                             "`phaselens probe`") from None
        return {name: RooflineResult(**entry) for name, entry in raw.items()}

    def get(self, name: str) -> RooflineResult | None:
        return self.load().get(name)

    def put(self, result: RooflineResult) -> None:
        entries = self.load()
        entries[result.device_name] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v.to_dict() for k, v in entries.items()}, indent=2, sort_keys=True))
        tmp.replace(self.path)


def peaks_for(name: str, cache: RooflineCache | None = None) -> tuple[float, float, str] | None:
    """(peak FLOP/s, peak bytes/s, source) for a GPU name: the probe's figures if cached, else the datasheet.

    None when neither knows the GPU: callers must then say MFU/MBU are unknown rather than guess.
    """
    measured = (cache or RooflineCache()).get(name)
    if measured is not None:
        return measured.matmul_flops_per_s, measured.copy_bytes_per_s, "probe"
    spec = find_gpu_spec(name)
    if spec is not None:
        return spec.peak_bf16_flops, spec.peak_dram_bytes_per_s, "datasheet"
    return None
