"""NVML sampler: utilization, memory utilization, power, SM clock, memory used, and the utilization buffer.

``nvmlDeviceGetUtilizationRates`` averages over 1/6 to 1 s (driver-dependent); ``nvmlDeviceGetSamples``
returns the driver's own buffer of GPU-utilization samples with their timestamps, which we pass on as
samples at those timestamps (each only once), so nothing is re-timed to the poll. Because they carry their
own timestamps, the buffer is read every ``buffer_interval_ns`` (5 s) rather than every poll: one read cost
3.2 ms of CPU on the H100, 0.32% of a core at one read a second (bench/RESULTS.md, 06:14), for the same
samples. A read whose oldest new sample comes more than a buffer interval after the previous read's newest
means the driver's buffer wrapped in between: that is logged (throttled), and the interval should shrink.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from phaselens.agent.samplers.base import FieldSkipper, SampledGpu, Throttled, mark_lost, select_gpus
from phaselens.agent.samplers.nvml_common import enumerate_gpus, is_lost, is_unsupported, load_nvml
from phaselens.trace import SampleRecord

log = logging.getLogger(__name__)


class NvmlSampler:
    """Reads the classic NVML fields of every GPU it was given (matched by UUID)."""

    name = "nvml"

    def __init__(self, nvml: Any = None, uuids: list[str] | None = None,
                 clock: Callable[[], int] = time.time_ns, utilization_buffer: bool = True,
                 buffer_interval_ns: int = 5_000_000_000):
        self.nvml = load_nvml(nvml)
        self.clock = clock
        self.skipper = FieldSkipper(self.name)
        self.throttled = Throttled()
        self.nvml.nvmlInit()
        self.gpus: list[SampledGpu] = select_gpus(enumerate_gpus(self.nvml), uuids, self.name)
        self.utilization_buffer = utilization_buffer
        #: the last poll's transient error (a timeout, ...), "" when it read everything it could
        self.last_error = ""
        #: per GPU, the newest utilization-buffer timestamp passed on (µs, NVML's unit)
        self._last_buffer_us: dict[str, int] = {g.uuid: 0 for g in self.gpus}
        self.buffer_interval_ns = buffer_interval_ns
        #: per GPU, when the utilization buffer is next read (ns, this sampler's clock)
        self._next_buffer_ns: dict[str, int] = {g.uuid: 0 for g in self.gpus}

    @property
    def failed(self) -> list[SampledGpu]:
        return [g for g in self.gpus if g.failed]

    def sample(self) -> list[SampleRecord]:
        out: list[SampleRecord] = []
        self.last_error = ""
        for gpu in self.gpus:
            if not gpu.failed:
                out.extend(self._sample_one(gpu))
        return out

    def _read(self, gpu: SampledGpu, key: str, fn: Callable[[], Any]) -> Any:
        """fn() or None; an unsupported field is logged once and skipped; a lost GPU raises _Lost."""
        if key in gpu.unsupported:
            return None
        try:
            return fn()
        except self.nvml.NVMLError as exc:
            if is_lost(self.nvml, exc):
                raise _Lost(str(exc)) from None
            if is_unsupported(self.nvml, exc):
                if self.skipper.skip(gpu, key, str(exc)):
                    self.last_error = f"{key} of {gpu.uuid} is not supported ({exc}); skipped from now on"
            else:  # transient (a timeout, ...): this poll failed for the health metrics; retried next poll
                self.last_error = f"{key} of {gpu.uuid} failed: {exc}"
                self.throttled.warning(f"{key} {gpu.uuid}", "nvml sampler: %s of %s failed: %s", key,
                                       gpu.uuid, exc)
            return None

    def _sample_one(self, gpu: SampledGpu) -> list[SampleRecord]:
        nv, h = self.nvml, gpu.handle
        values: dict[str, float | None] = {}
        try:
            t = self.clock()
            rates = self._read(gpu, "utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
            if rates is not None:
                values["gpu_util"] = rates.gpu / 100.0
                values["mem_util"] = rates.memory / 100.0
            power = self._read(gpu, "power_w", lambda: nv.nvmlDeviceGetPowerUsage(h))
            if power is not None:
                values["power_w"] = power / 1000.0  # mW
            clock = self._read(gpu, "sm_clock_hz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
            if clock is not None:
                values["sm_clock_hz"] = clock * 1e6  # MHz
            mem = self._read(gpu, "mem_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h))
            if mem is not None:
                values["mem_used_bytes"] = float(mem.used)
            out = [SampleRecord(gpu_uuid=gpu.uuid, source=self.name, t_ns=t, values=values)] if values else []
            if self.utilization_buffer and t >= self._next_buffer_ns[gpu.uuid]:
                self._next_buffer_ns[gpu.uuid] = t + self.buffer_interval_ns
                out.extend(self._buffer(gpu))
        except _Lost as exc:
            mark_lost(self.name, gpu, str(exc))
            return []
        return out

    def _buffer(self, gpu: SampledGpu) -> list[SampleRecord]:
        nv = self.nvml
        got = self._read(gpu, "utilization_samples", lambda: nv.nvmlDeviceGetSamples(
            gpu.handle, nv.NVML_GPU_UTILIZATION_SAMPLES, self._last_buffer_us[gpu.uuid]))
        if got is None:
            return []
        _, samples = got
        last = self._last_buffer_us[gpu.uuid]
        new = [int(s.timeStamp) for s in samples if s.timeStamp > last]
        if last and new and min(new) - last > self.buffer_interval_ns // 1000 + 1_000_000:
            self.throttled.warning(f"buffer {gpu.uuid}", "nvml sampler: utilization buffer of %s wrapped "
                                   "between reads (%.1f s without samples); read it more often", gpu.uuid,
                                   (min(new) - last) / 1e6)
        out = []
        for s in samples:
            if s.timeStamp <= last:
                continue
            out.append(SampleRecord(gpu_uuid=gpu.uuid, source=self.name, t_ns=int(s.timeStamp) * 1000,
                                    values={"gpu_util": s.sampleValue.uiVal / 100.0}))
            self._last_buffer_us[gpu.uuid] = max(self._last_buffer_us[gpu.uuid], int(s.timeStamp))
        if last == 0:
            return []  # the first read returns the driver's whole history: it only sets the mark
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)


class _Lost(Exception):
    """The GPU stopped answering."""
