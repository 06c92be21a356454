"""Simulated GPM-like counters for machines without a GPU, made from the received step timeline.

It does what the H100 does (bench/attribution_accuracy.py recordings, bench/RESULTS.md): counters refresh
every ``refresh_ms`` (100); the window a refresh reports ends ``lag`` before the refresh, and the lag is a
sawtooth that drifts by ``lag_drift_ms_per_s`` (0.4 on the H100) between ``lag_min_ms`` (10) and
``lag_min_ms + refresh_ms``, then wraps; each phase has its own signature (defaults: the means of long pure
runs on an H100 80GB HBM3 of our synthetic prefill/decode/mixed bursts) plus Gaussian noise; now and then a
refresh reads all zeros and the next one reads inflated DRAM (a glitch, as the issue reports). Polls that see
no refresh carry ``None`` values, like the GPM sampler. Always ``source="simulated"``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from phaselens.phase import Phase
from phaselens.trace import SampleRecord, StepRecord

SIM_KEYS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active", "fp16_active")

#: Per-phase signatures measured on an H100 80GB HBM3 (GPM, long pure runs of the ground-truth workload,
#: 2026-11-23): prefill = bf16 8192^3 matmuls, decode = batch-16 GEMV-like matmuls over a 0.94 GB weight,
#: mixed = both interleaved ~60/40 by time.
H100_SIGNATURES: dict[Phase, dict[str, float]] = {
    Phase.PREFILL: {"sm_active": 0.967, "sm_occupancy": 0.143, "tensor_active": 0.938, "dram_active": 0.255,
                    "fp16_active": 0.0},
    Phase.DECODE: {"sm_active": 0.834, "sm_occupancy": 0.120, "tensor_active": 0.045, "dram_active": 0.855,
                   "fp16_active": 0.0},
    Phase.MIXED: {"sm_active": 0.913, "sm_occupancy": 0.134, "tensor_active": 0.583, "dram_active": 0.506,
                  "fp16_active": 0.0},
    Phase.IDLE: {k: 0.0 for k in SIM_KEYS},
}


class StepSource(Protocol):
    def steps_between(self, gpu_uuid: str, t0_ns: int, t1_ns: int) -> Iterable[StepRecord]: ...


@dataclass
class SimulatedGpuModel:
    """How the simulated counters behave; defaults from our H100 recordings."""

    refresh_ms: float = 100.0
    lag_min_ms: float = 10.0
    lag_start_ms: float = 50.0
    lag_drift_ms_per_s: float = 0.4
    noise: float = 0.005
    glitch_rate: float = 0.002
    glitch_dram_factor: float = 1.5
    signatures: dict[Phase, dict[str, float]] = field(default_factory=lambda: dict(H100_SIGNATURES))

    def lag_ms(self, t_s: float) -> float:
        """The sawtooth delay between a window's end and the refresh that reports it, at time t_s."""
        return self.lag_min_ms + (self.lag_start_ms - self.lag_min_ms + self.lag_drift_ms_per_s * t_s) \
            % self.refresh_ms


class SimulatedSampler:
    """GPM-like samples for ``gpu_uuids`` (``GPU-sim-<n>`` on CPU) from the steps ``steps`` holds."""

    name = "simulated"
    #: it reads the step timeline: the daemon hands it every step received before each poll
    reads_steps = True

    def __init__(self, gpu_uuids: list[str], steps: StepSource, model: SimulatedGpuModel | None = None,
                 seed: int = 0, clock: Callable[[], int] = time.time_ns):
        if not gpu_uuids:
            raise ValueError("simulated sampler needs at least one GPU UUID")
        self.gpu_uuids = list(gpu_uuids)
        self.steps = steps
        self.model = model or SimulatedGpuModel()
        self.clock = clock
        self.rng = random.Random(seed)
        self._t_start: int | None = None
        self._last_refresh: dict[str, int] = {}
        self._glitched: dict[str, bool] = {u: False for u in self.gpu_uuids}

    def sample(self) -> list[SampleRecord]:
        now = self.clock()
        if self._t_start is None:
            self._t_start = now
            for u in self.gpu_uuids:
                self._last_refresh[u] = now
        period = int(self.model.refresh_ms * 1e6)
        latest = now - (now - self._t_start) % period
        out = []
        for uuid in self.gpu_uuids:
            if latest <= self._last_refresh[uuid]:
                out.append(SampleRecord(gpu_uuid=uuid, source=self.name, t_ns=now,
                                        values={k: None for k in SIM_KEYS}))
                continue
            self._last_refresh[uuid] = latest
            values = self.window(uuid, latest)
            out.append(SampleRecord(gpu_uuid=uuid, source=self.name, t_ns=now, values=values))
        return out

    def window(self, uuid: str, refresh_ns: int) -> dict[str, float | None]:
        """The values a refresh at ``refresh_ns`` reports for ``uuid``."""
        m = self.model
        assert self._t_start is not None
        lag = int(m.lag_ms((refresh_ns - self._t_start) / 1e9) * 1e6)
        end = refresh_ns - lag
        start = end - int(m.refresh_ms * 1e6)
        busy = {p: 0 for p in Phase.busy()}
        for s in self.steps.steps_between(uuid, start, end):
            ov = min(s.t1_ns, end) - max(s.t0_ns, start)
            if ov > 0 and s.phase in busy:
                busy[s.phase] += ov
        width = end - start
        fr = {p: min(1.0, v / width) for p, v in busy.items()}
        fr[Phase.IDLE] = max(0.0, 1.0 - sum(fr.values()))
        if self.rng.random() < m.glitch_rate:
            self._glitched[uuid] = True
            return {k: 0.0 for k in SIM_KEYS}
        values: dict[str, float | None] = {}
        for key in SIM_KEYS:
            v = sum(fr[p] * m.signatures[p][key] for p in fr) + self.rng.gauss(0.0, m.noise)
            if key == "dram_active" and self._glitched[uuid]:
                v *= m.glitch_dram_factor
            values[key] = min(1.0, max(0.0, v))
        self._glitched[uuid] = False
        return values
