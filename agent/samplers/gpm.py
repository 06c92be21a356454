"""NVML GPM sampler: SM active, SM occupancy, tensor active, DRAM active, FP16 (ratios 0..1).

Each poll takes a GPM sample and asks NVML for the metrics between it and the previous poll's sample, so a
value is the delta since the previous poll (DESIGN.md, "Trace format"). GPM refreshes its counters about
every 100 ms; between refreshes two samples hold the same data and NVML computes DRAM bandwidth as 0/0 (NaN,
seen on the H100, bench/attribution_accuracy.py): such a poll is "not updated" and every value is ``None``.
An idle GPU's refresh reads small finite numbers, so it is not confused with "not updated".
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from typing import Any, Callable

from phaselens.agent.samplers.base import FieldSkipper, SampledGpu, Throttled, mark_lost, select_gpus
from phaselens.agent.samplers.nvml_common import enumerate_gpus, is_lost, load_nvml
from phaselens.trace import SampleRecord

log = logging.getLogger(__name__)

#: canonical key -> name of the pynvml metric-id constant (values are percent)
GPM_FIELDS = {
    "sm_active": "NVML_GPM_METRIC_SM_UTIL",
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
    "tensor_active": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "dram_active": "NVML_GPM_METRIC_DRAM_BW_UTIL",
    "fp16_active": "NVML_GPM_METRIC_FP16_UTIL",
}
#: the metric whose NaN marks a poll that saw no refresh
_UPDATE_MARKER = "dram_active"
#: cadence-locked polling (next_due_ns): poll this early before an expected refresh, retry this often
_EARLY_NS = 250_000
_RETRY_NS = 4_000_000
#: a refresh seen by a poll at most this long after the GPU's previous poll is "pinned": it happened within
#: that time before it was seen (polls of the 10 ms start-up grid, retries)
_PINNED_NS = 10_000_000


class GpmSampler:
    """Polls NVML GPM on every GPU it was given (all by default, matched by UUID).

    ``nvml`` is the pynvml module or a fake (tests); ``clock`` returns wall-clock ns.
    ValueError at construction for a GPU UUID that is not here; GPUs without GPM support are logged and
    left out.
    """

    name = "gpm"

    def __init__(self, nvml: Any = None, uuids: list[str] | None = None,
                 clock: Callable[[], int] = time.time_ns):
        self.nvml = load_nvml(nvml)
        self.clock = clock
        self.skipper = FieldSkipper(self.name)
        self.throttled = Throttled()
        self.nvml.nvmlInit()
        gpus = select_gpus(enumerate_gpus(self.nvml), uuids, self.name)
        self.gpus: list[SampledGpu] = []
        self._buffers: dict[str, list[Any]] = {}
        self._current: dict[str, int] = {}
        self._primed: dict[str, bool] = {}
        #: per GPU: the request struct, reused (ctypes allocation per poll costs more than the call) and the
        #: metric keys it was built for
        self._requests: dict[str, tuple[tuple[str, ...], Any]] = {}
        #: per GPU: times of the last refreshes seen; of the last pinned ones (seen soon after the previous
        #: poll), with how soon; when it was last polled (for :meth:`next_due_ns`)
        self._updates: dict[str, deque[int]] = {}
        self._pinned: dict[str, deque[tuple[int, int]]] = {}
        self._last_poll: dict[str, int | None] = {}
        #: per GPU: when it is due (planned by :meth:`next_due_ns`), the earliest of those (what the caller
        #: was told; 0 until planned: every call polls every GPU), and the GPUs the last call polled. Each GPU
        #: refreshes on its own phase: polling every GPU whenever one is due would poll each of N GPUs about
        #: N times per refresh.
        self._due: dict[str, int] = {}
        self._planned = 0
        self._polled: set[str] = set()
        for gpu in gpus:
            try:
                supported = self.nvml.nvmlGpmQueryDeviceSupport(gpu.handle).isSupportedDevice
            except self.nvml.NVMLError as exc:
                supported, why = 0, str(exc)
            else:
                why = "the driver says GPM is not supported on this GPU"
            if not supported:
                log.warning("gpm sampler: GPU %s (%s) left out: %s", gpu.uuid, gpu.name, why)
                continue
            self.gpus.append(gpu)
            self._buffers[gpu.uuid] = [self.nvml.nvmlGpmSampleAlloc(), self.nvml.nvmlGpmSampleAlloc()]
            self._current[gpu.uuid] = 0
            self._primed[gpu.uuid] = False
            self._updates[gpu.uuid] = deque(maxlen=9)
            self._pinned[gpu.uuid] = deque(maxlen=16)
            self._last_poll[gpu.uuid] = None
        #: the last poll's transient error (a timeout, ...), "" when every live GPU answered
        self.last_error = ""
        self._ids = {key: getattr(self.nvml, const) for key, const in GPM_FIELDS.items()
                     if hasattr(self.nvml, const)}

    @property
    def failed(self) -> list[SampledGpu]:
        return [g for g in self.gpus if g.failed]

    def sample(self) -> list[SampleRecord]:
        """One GPM delta per live GPU that is due (every live GPU until :meth:`next_due_ns` plans them);
        values ``None`` when the counters had not refreshed."""
        out = []
        self.last_error = ""
        self._polled.clear()
        for gpu in self.gpus:
            # due by the plan this call was made for (no clock read here: the caller's clock decides when)
            if gpu.failed or self._due.get(gpu.uuid, 0) > self._planned:
                continue
            self._polled.add(gpu.uuid)
            rec = self._sample_one(gpu)
            if rec is not None:
                out.append(rec)
        return out

    def _sample_one(self, gpu: SampledGpu) -> SampleRecord | None:
        nv = self.nvml
        bufs = self._buffers[gpu.uuid]
        cur = self._current[gpu.uuid]
        nxt = 1 - cur
        t0 = self.clock()
        try:
            nv.nvmlGpmSampleGet(gpu.handle, bufs[nxt])
        except nv.NVMLError as exc:
            if is_lost(nv, exc):
                mark_lost(self.name, gpu, str(exc))
            else:
                self.last_error = f"sample of {gpu.uuid} failed: {exc}"
                self.throttled.warning(f"sample {gpu.uuid}", "gpm sampler: sample of %s failed: %s",
                                       gpu.uuid, exc)
            return None
        t = (t0 + self.clock()) // 2
        self._current[gpu.uuid] = nxt
        previous_poll, self._last_poll[gpu.uuid] = self._last_poll[gpu.uuid], t
        if not self._primed[gpu.uuid]:
            self._primed[gpu.uuid] = True  # the first sample only starts the first delta
            return None
        keys = tuple(k for k in self._ids if k not in gpu.unsupported)
        request = self._requests.get(gpu.uuid)
        if request is None or request[0] != keys:
            mg = nv.c_nvmlGpmMetricsGet_t()
            mg.version = nv.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(keys)
            for i, key in enumerate(keys):
                mg.metrics[i].metricId = self._ids[key]
            self._requests[gpu.uuid] = (keys, mg)
        else:
            mg = request[1]
        mg.sample1 = bufs[cur]
        mg.sample2 = bufs[nxt]
        try:
            nv.nvmlGpmMetricsGet(mg)
        except nv.NVMLError as exc:
            if is_lost(nv, exc):
                mark_lost(self.name, gpu, str(exc))
            else:
                self.last_error = f"metrics of {gpu.uuid} failed: {exc}"
                self.throttled.warning(f"metrics {gpu.uuid}", "gpm sampler: metrics of %s failed: %s",
                                       gpu.uuid, exc)
            return None
        values: dict[str, float | None] = {}
        for i, key in enumerate(keys):
            metric = mg.metrics[i]
            if metric.nvmlReturn != nv.NVML_SUCCESS:
                if self.skipper.skip(gpu, key, f"nvmlReturn {metric.nvmlReturn}"):
                    self.last_error = f"{key} of {gpu.uuid} is not supported (nvmlReturn " \
                                      f"{metric.nvmlReturn}); skipped from now on"
                continue
            values[key] = float(metric.value)
        marker = values.get(_UPDATE_MARKER)
        if marker is not None and math.isnan(marker):
            return SampleRecord(gpu_uuid=gpu.uuid, source=self.name, t_ns=t, values={k: None for k in values})
        ratios = {k: (None if math.isnan(v) else min(1.0, max(0.0, v / 100.0))) for k, v in values.items()
                  if v is not None}
        self._updates[gpu.uuid].append(t)
        if previous_poll is not None and t - previous_poll <= _PINNED_NS:
            self._pinned[gpu.uuid].append((t, t - previous_poll))
        return SampleRecord(gpu_uuid=gpu.uuid, source=self.name, t_ns=t, values=ratios)

    def next_due_ns(self, now_ns: int, interval_ns: int) -> int:
        """When to poll next. GPM refreshes on a steady cadence (~100 ms, +-1 ms on the H100), so once the
        cadence is known the sampler sleeps until just before the next expected refresh and, if that poll
        finds no refresh yet, polls again every ``min(interval, 4 ms)`` until it does: about one poll per
        refresh, each seen within a few ms (a slowly varying delay the attribution's offset absorbs).

        The expected refresh is the last seen one plus the period, a little early. A poll sees a refresh
        some time after it happened, so each planned poll comes closer to its refresh until one comes before
        it; the retry sees it within 4 ms and the cycle starts again: one extra poll every ~16 refreshes
        (2 ms early gave one every other refresh: 1.43 polls per refresh on the H100, issue 12). "A little"
        is 0.25 ms plus the period's uncertainty (:func:`_period`), so the plan never runs late.

        Planned per GPU (each has its own refresh phase); the next :meth:`sample` polls only the GPUs due by
        the time returned, and a GPU the last call did not poll keeps its plan (if that is already past, it is
        polled at once)."""
        dues = []
        for gpu in self.gpus:
            if gpu.failed:
                continue
            due = self._due.get(gpu.uuid, 0)
            if gpu.uuid in self._polled or gpu.uuid not in self._due:
                seen = self._updates.get(gpu.uuid)
                if not seen or len(seen) < 4:
                    due = now_ns + interval_ns
                else:
                    period, error = _period(seen, self._pinned[gpu.uuid])
                    due = int(seen[-1] + period - error - _EARLY_NS)
                    if due <= now_ns:
                        due = now_ns + min(interval_ns, _RETRY_NS)
                self._due[gpu.uuid] = due
            dues.append(due)
        self._planned = min(dues) if dues else now_ns + interval_ns
        return self._planned

    def close(self) -> None:
        for bufs in self._buffers.values():
            for buf in bufs:
                try:
                    self.nvml.nvmlGpmSampleFree(buf)
                except self.nvml.NVMLError:
                    pass  # shutting down: a lost GPU's buffers cannot be freed any more
        self._buffers.clear()
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)


def _period(seen: deque[int], pinned: deque[tuple[int, int]]) -> tuple[float, float]:
    """(refresh period, its uncertainty) in ns.

    The median gap between seen refreshes is a first guess, but the planned polls shape those gaps (each
    comes 0.25 ms early), and a period taken from them would follow the plan, not the GPU. Pinned refreshes
    (seen within ``w`` ns of the previous poll, so they happened in those ``w`` ns) do not depend on the
    plan: the span between the oldest and newest of them, over the whole number of periods in it, is the
    period to within max(w) / periods."""
    guess = statistics.median(b - a for a, b in zip(seen, list(seen)[1:]))
    if len(pinned) >= 2 and guess > 0:
        (t_a, w_a), (t_b, w_b) = pinned[0], pinned[-1]
        periods = round((t_b - t_a) / guess)
        if periods >= 1:
            return (t_b - t_a) / periods, max(w_a, w_b) / periods
    return guess, 0.1 * guess
