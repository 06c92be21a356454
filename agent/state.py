"""What the agent knows right now: the hand-off between the daemon loop and the exporters.

The daemon writes (``publish_attribution``, ``observe_step``, ``sampler_result``, ``count_*``); the
Prometheus and OTLP exporters read a consistent :class:`AgentSnapshot` with :meth:`AgentState.snapshot`.
All figures are in base units; utilizations are ratios 0..1 (DESIGN.md, "Prometheus names").
"""

from __future__ import annotations

import bisect
import copy
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from phaselens.phase import Phase
from phaselens.trace import StepRecord

log = logging.getLogger(__name__)

#: Step-duration histogram bucket upper bounds, seconds (engine steps take ~1 ms to ~1 s).
STEP_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


@dataclass
class PhaseValues:
    """Per-phase attribution of one GPU."""

    time_share: float
    #: canonical metric key -> estimated ratio while this phase runs
    values: dict[str, float] = field(default_factory=dict)
    #: canonical metric key -> standard error of the estimate
    uncertainty: dict[str, float] = field(default_factory=dict)
    mfu: float | None = None
    mbu: float | None = None


@dataclass
class GpuIdentity:
    uuid: str
    index: int
    name: str
    model_name: str = ""
    role: str = ""
    pod: str = ""
    namespace: str = ""
    container: str = ""
    #: where its counters come from: the agent's source, or "simulated" for generated data (never real)
    source: str = ""


@dataclass
class GpuAttribution:
    """One GPU's result of one attribution pass (the shape of `phaselens attribute --json`)."""

    gpu: GpuIdentity
    #: busy phases; a phase missing here, or with empty ``values`` (then only the exact MFU/MBU from its
    #: steps), had "not enough data" for the counters
    phases: dict[Phase, PhaseValues] = field(default_factory=dict)
    #: time share of every phase including IDLE over the horizon
    time_share: dict[Phase, float] = field(default_factory=dict)
    #: blended raw values over the horizon (what a per-GPU dashboard shows today)
    blended: dict[str, float] = field(default_factory=dict)
    alignment_offset_s: float | None = None
    windows: int = 0
    method: str = "unmix"
    updated_ns: int = 0


@dataclass
class SamplerHealth:
    name: str
    success: bool
    duration_s: float
    last_error: str = ""


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        """Count ``value`` in every bucket whose bound is >= it (``counts`` are cumulative)."""
        counts = self.counts
        for i in range(bisect.bisect_left(self.bounds, value), len(counts)):
            counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class AgentSnapshot:
    """A consistent copy of the agent's state for one scrape or push."""

    hostname: str
    started: bool
    gpus: dict[str, GpuIdentity]
    attribution: dict[str, GpuAttribution]
    samplers: dict[str, SamplerHealth]
    #: (gpu_uuid, phase) -> seconds the phase ran
    busy_seconds: dict[tuple[str, Phase], float]
    #: (gpu_uuid, phase, kind) -> tokens, kind in {"prefill", "decode"}
    tokens: dict[tuple[str, Phase, str], int]
    #: (gpu_uuid, phase) -> histogram of step durations
    step_durations: dict[tuple[str, Phase], Histogram]
    #: gpu_uuid -> canonical key -> latest raw value
    raw: dict[str, dict[str, float]]
    shim_received: int
    shim_rejected: dict[str, int]
    taken_ns: int
    #: sampler name -> polls that failed (a lost GPU, an NVML timeout, an unreachable exporter, ...)
    sampler_errors: dict[str, int] = field(default_factory=dict)
    #: why the trace recorder stopped ("" while it writes, or when there is none)
    recorder_error: str = ""


class AgentState:
    """Thread-safe holder of what the agent has measured and attributed."""

    def __init__(self, hostname: str):
        self._lock = threading.Lock()
        self.hostname = hostname
        self._started = False
        self._gpus: dict[str, GpuIdentity] = {}
        self._attribution: dict[str, GpuAttribution] = {}
        self._samplers: dict[str, SamplerHealth] = {}
        self._busy: dict[tuple[str, Phase], float] = defaultdict(float)
        self._tokens: dict[tuple[str, Phase, str], int] = defaultdict(int)
        self._durations: dict[tuple[str, Phase], Histogram] = {}
        self._raw: dict[str, dict[str, float]] = defaultdict(dict)
        self._received = 0
        self._rejected: dict[str, int] = defaultdict(int)
        self._step_listeners: list[Callable[[StepRecord], None]] = []
        self._failed_listeners: set[int] = set()  # logged once each
        self._sampler_errors: dict[str, int] = defaultdict(int)
        self._recorder_error = ""

    # -- writers (the daemon)

    def mark_started(self) -> None:
        with self._lock:
            self._started = True

    def set_gpus(self, gpus: list[GpuIdentity]) -> None:
        with self._lock:
            self._gpus = {g.uuid: g for g in gpus}

    def publish_attribution(self, result: GpuAttribution) -> None:
        with self._lock:
            self._attribution[result.gpu.uuid] = result

    def add_step_listener(self, listener: Callable[[StepRecord], None]) -> None:
        """Call ``listener`` with every step observed from now on (the OTLP exporter records its duration
        histogram from the steps themselves). It runs on the observing thread and must not block."""
        self._step_listeners.append(listener)

    def observe_step(self, step: StepRecord, *, received: bool = False) -> None:
        """Count one step's busy time, tokens and duration; ``received``: also count it as a record received
        from a shim (one lock for both: the receiver does this for every datagram)."""
        key = (step.gpu_uuid, step.phase)
        with self._lock:
            if received:
                self._received += 1
            self._busy[key] += step.duration_s
            if step.prefill_tokens:
                self._tokens[(step.gpu_uuid, step.phase, "prefill")] += step.prefill_tokens
            if step.decode_tokens:
                self._tokens[(step.gpu_uuid, step.phase, "decode")] += step.decode_tokens
            hist = self._durations.get(key)
            if hist is None:
                hist = Histogram(STEP_DURATION_BUCKETS_S, [0] * len(STEP_DURATION_BUCKETS_S))
                self._durations[key] = hist
            hist.observe(step.duration_s)
        for listener in self._step_listeners:
            try:
                listener(step)
            except Exception:  # noqa: BLE001 - an exporter's fault must not end the receiving thread
                if id(listener) not in self._failed_listeners:
                    self._failed_listeners.add(id(listener))
                    log.exception("step listener %r failed (logged once; it keeps being called)", listener)

    def update_raw(self, gpu_uuid: str, values: dict[str, float | None]) -> None:
        with self._lock:
            raw = self._raw[gpu_uuid]
            for key, value in values.items():
                if value is not None:
                    raw[key] = value

    def forget_raw(self, gpu_uuid: str) -> None:
        """Drop a lost GPU's latest readings: a stale power or clock gauge would say it still runs."""
        with self._lock:
            self._raw.pop(gpu_uuid, None)

    def sampler_result(self, health: SamplerHealth) -> None:
        with self._lock:
            self._samplers[health.name] = health
            # a failed poll is counted, not only shown: the next good poll resets the success gauge before
            # a scrape may see it
            self._sampler_errors[health.name] += 0 if health.success else 1

    def recorder_failed(self, error: str) -> None:
        """The trace recorder stopped (disk full, ...): exported as phaselens_agent_recorder_failed."""
        with self._lock:
            self._recorder_error = error

    def count_received(self, n: int = 1) -> None:
        with self._lock:
            self._received += n

    def count_rejected(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._rejected[reason] += n

    # -- reader (the exporters)

    def snapshot(self) -> AgentSnapshot:
        with self._lock:
            return AgentSnapshot(
                hostname=self.hostname,
                started=self._started,
                gpus=dict(self._gpus),
                attribution=copy.deepcopy(self._attribution),
                samplers=dict(self._samplers),
                busy_seconds=dict(self._busy),
                tokens=dict(self._tokens),
                step_durations=copy.deepcopy(self._durations),
                raw={k: dict(v) for k, v in self._raw.items()},
                shim_received=self._received,
                shim_rejected=dict(self._rejected),
                taken_ns=time.time_ns(),
                sampler_errors=dict(self._sampler_errors),
                recorder_error=self._recorder_error,
            )
