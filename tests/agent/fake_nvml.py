"""A fake of the parts of pynvml the samplers use: GPUs whose fields, support and loss tests control.

GPM behaves like the H100 we measured: counters refresh every ``refresh_polls`` samples; between refreshes
NVML computes DRAM bandwidth as 0/0 (NaN) and the other metrics as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {v: k for k, v in FakeNvml.ERRORS.items()}.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    #: GPM metric id -> percent
    gpm: dict[int, float] = field(default_factory=lambda: {2: 96.7, 3: 14.3, 5: 93.8, 10: 25.5, 13: 0.0})
    gpm_supported: bool = True
    #: unsupported things: GPM metric ids (int) or "utilization", "power", "clock", "memory", "samples"
    unsupported: set = field(default_factory=set)
    lost: bool = False
    refresh_polls: int = 5
    polls: int = 0
    util: tuple[int, int] = (87, 41)
    power_mw: int = 612_000
    sm_clock_mhz: int = 1755
    mem_used: int = 40 * 1024**3
    util_samples: list = field(default_factory=list)  # (timestamp_us, percent)


class FakeNvml:
    ERRORS = {"NVML_ERROR_UNINITIALIZED": 1, "NVML_ERROR_INVALID_ARGUMENT": 2, "NVML_ERROR_NOT_SUPPORTED": 3,
              "NVML_ERROR_NO_PERMISSION": 4, "NVML_ERROR_NOT_FOUND": 6, "NVML_ERROR_DRIVER_NOT_LOADED": 9,
              "NVML_ERROR_FUNCTION_NOT_FOUND": 13, "NVML_ERROR_GPU_IS_LOST": 15, "NVML_ERROR_UNKNOWN": 999}
    NVML_SUCCESS = 0
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10
    NVML_GPM_METRIC_FP16_UTIL = 13
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_CLOCK_SM = 1
    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu]):
        self.gpus = gpus
        self.initialized = 0
        for name, value in self.ERRORS.items():
            setattr(self, name, value)

    # -- library
    def nvmlInit(self) -> None:
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def _alive(self, gpu: FakeGpu) -> FakeGpu:
        if gpu.lost:
            raise NVMLError(15)
        return gpu

    def _check(self, gpu: FakeGpu, what: str) -> FakeGpu:
        self._alive(gpu)
        if what in gpu.unsupported:
            raise NVMLError(3)
        return gpu

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return self._alive(gpu).uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return self._alive(gpu).name

    # -- classic fields
    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu):
        g = self._check(gpu, "utilization")
        return SimpleNamespace(gpu=g.util[0], memory=g.util[1])

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        return self._check(gpu, "power").power_mw

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, kind: int) -> int:
        return self._check(gpu, "clock").sm_clock_mhz

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu):
        return SimpleNamespace(used=self._check(gpu, "memory").mem_used, total=80 * 1024**3)

    def nvmlDeviceGetSamples(self, gpu: FakeGpu, kind: int, since_us: int):
        g = self._check(gpu, "samples")
        rows = [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=v)) for t, v in g.util_samples
                if t > since_us]
        return 1, rows

    # -- GPM
    def nvmlGpmQueryDeviceSupport(self, gpu: FakeGpu):
        return SimpleNamespace(isSupportedDevice=int(self._alive(gpu).gpm_supported))

    def nvmlGpmSampleAlloc(self):
        return SimpleNamespace(gpu=None, generation=-1)

    def nvmlGpmSampleFree(self, sample) -> None:
        pass

    def nvmlGpmSampleGet(self, gpu: FakeGpu, sample) -> None:
        g = self._alive(gpu)
        sample.gpu = g
        sample.generation = g.polls // g.refresh_polls
        g.polls += 1

    class c_nvmlGpmMetricsGet_t:  # noqa: N801 - pynvml's name
        def __init__(self) -> None:
            self.version = 0
            self.numMetrics = 0
            self.sample1 = None
            self.sample2 = None
            self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(98)]

    def nvmlGpmMetricsGet(self, mg) -> None:
        g = self._alive(mg.sample2.gpu)
        same = mg.sample1.generation == mg.sample2.generation
        for m in mg.metrics[: mg.numMetrics]:
            if m.metricId in g.unsupported:
                m.nvmlReturn, m.value = 3, 0.0
                continue
            m.nvmlReturn = 0
            if same:
                m.value = math.nan if m.metricId == 10 else 0.0
            else:
                m.value = g.gpm[m.metricId]
