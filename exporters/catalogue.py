"""The metric catalogue: every metric phaselens exports, as data (DESIGN.md, "Prometheus names").

This is the one list of names. The agent's collector (``exporters/prometheus.py``), the engine's and the
advisor's metrics, the OTLP exporter, the dashboards and the Prometheus rules are all checked against it
(``tests/exporters/test_catalogue.py``). Add a metric here first, then produce it.

Usage from another package::

    from phaselens.exporters import catalogue
    ttft = catalogue.create(catalogue.metric("phaselens_engine_time_to_first_token_seconds"), registry=reg)
    ttft.labels(hostname="n1", model_name="tiny", role="colocated").observe(0.05)

Conventions (Prometheus naming best practices): base units (seconds, bytes, ratios 0..1), counters end in
``_total``, lower snake_case labels. ``name`` is the name as exposed (with ``_total`` for counters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Labels every per-GPU series carries. Empty values mean "not known" (e.g. no pod outside Kubernetes);
#: Prometheus treats an empty label as absent, so queries need no special case. ``source`` says where the
#: GPU's counters come from (gpm, nvml, dcgm, replay) and is ``simulated`` for generated data, so that no
#: query mistakes it for a real GPU.
GPU_LABELS: tuple[str, ...] = ("hostname", "gpu", "gpu_uuid", "model_name", "role", "pod", "namespace",
                               "container", "source")
#: Labels of the engine's own (per-engine, not per-GPU) series.
ENGINE_LABELS: tuple[str, ...] = ("hostname", "model_name", "role")
#: ... and of the series one engine worker reports.
WORKER_LABELS: tuple[str, ...] = ENGINE_LABELS + ("worker",)

# OpenTelemetry GenAI semantic conventions (gen-ai-metrics.md, "Metric: gen_ai.server.time_to_first_token"
# and "gen_ai.server.time_per_output_token"): the advised explicit bucket boundaries, seconds.
GENAI_TTFT_BUCKETS_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                           1.0, 2.5, 5.0, 7.5, 10.0)
GENAI_TPOT_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                           2.5)
# Same document, "Metric: gen_ai.server.request.duration".
GENAI_REQUEST_DURATION_BUCKETS_S: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                                                       5.12, 10.24, 20.48, 40.96, 81.92)
#: Engine steps take ~1 ms to ~1 s (same bounds as agent/state.py STEP_DURATION_BUCKETS_S).
STEP_DURATION_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                                              1.28, 2.56)
#: KV hand-off between pools: sub-millisecond on NVLink to ~1 s over a slow network.
KV_TRANSFER_BUCKETS_S: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                            1.0, 2.5)

TYPES = ("gauge", "counter", "histogram")
PRODUCERS = ("agent", "engine", "advisor")

# Prometheus unit suffix -> UCUM unit used by OpenTelemetry.
_OTEL_UNITS = {"ratio": "1", "seconds": "s", "bytes": "By", "watts": "W", "hertz": "Hz", "tokens": "{token}",
               "gpus": "{gpu}", "events": "{event}", "": "1"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its exposed Prometheus name and everything needed to produce or query it."""

    name: str
    type: str
    #: Prometheus unit suffix ("ratio", "seconds", ...) or "" for a plain count/flag.
    unit: str
    help: str
    labels: tuple[str, ...]
    producer: str
    #: histogram bucket upper bounds (without +Inf); empty for other types
    buckets: tuple[float, ...] = ()
    #: OpenTelemetry instrument name carrying the same meaning ("" = not exported over OTLP)
    otel_name: str = ""

    @property
    def base_name(self) -> str:
        """The name prometheus_client wants for a counter (without ``_total``)."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name

    @property
    def otel_unit(self) -> str:
        """The UCUM unit of the OTel instrument."""
        return _OTEL_UNITS[self.unit]

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The sample names this metric exposes in the Prometheus text format."""
        if self.type == "histogram":
            return (self.name + "_bucket", self.name + "_sum", self.name + "_count")
        return (self.name,)


def _agent(name: str, type_: str, unit: str, help_: str, labels: tuple[str, ...], *,
           buckets: tuple[float, ...] = (), otel_name: str = "") -> MetricSpec:
    return MetricSpec(name, type_, unit, help_, labels, "agent", buckets, otel_name)


def _engine(name: str, type_: str, unit: str, help_: str, labels: tuple[str, ...], *,
            buckets: tuple[float, ...] = (), otel_name: str = "") -> MetricSpec:
    return MetricSpec(name, type_, unit, help_, labels, "engine", buckets, otel_name)


def _advisor(name: str, type_: str, unit: str, help_: str, labels: tuple[str, ...], *,
             otel_name: str = "") -> MetricSpec:
    return MetricSpec(name, type_, unit, help_, labels, "advisor", (), otel_name)


_G = GPU_LABELS

METRICS: tuple[MetricSpec, ...] = (
    # ---- per-phase attribution (agent) -- DESIGN.md table
    _agent("phaselens_phase_utilization_ratio", "gauge", "ratio",
           "Estimated hardware activity while a phase runs on the GPU (attributed, not sampled at random), "
           "by canonical metric key.", _G + ("phase", "metric"), otel_name="phaselens.phase.utilization"),
    _agent("phaselens_phase_utilization_uncertainty_ratio", "gauge", "ratio",
           "Standard error of phaselens_phase_utilization_ratio.", _G + ("phase", "metric"),
           otel_name="phaselens.phase.utilization.uncertainty"),
    _agent("phaselens_phase_time_ratio", "gauge", "ratio",
           "Share of wall time the GPU spent in each phase (idle included) over the attribution horizon.",
           _G + ("phase",), otel_name="phaselens.phase.time"),
    _agent("phaselens_gpu_utilization_ratio", "gauge", "ratio",
           "Blended raw hardware activity over the attribution horizon (what a per-GPU dashboard shows), "
           "by canonical metric key.", _G + ("metric",), otel_name="phaselens.gpu.utilization"),
    _agent("phaselens_phase_mfu_ratio", "gauge", "ratio",
           "Model FLOPs utilization while a phase runs: step FLOPs / step GPU time / peak bf16 FLOP/s.",
           _G + ("phase",), otel_name="phaselens.phase.mfu"),
    _agent("phaselens_phase_mbu_ratio", "gauge", "ratio",
           "Model bandwidth utilization while a phase runs: step bytes / step GPU time / peak DRAM B/s.",
           _G + ("phase",), otel_name="phaselens.phase.mbu"),
    _agent("phaselens_phase_busy_seconds_total", "counter", "seconds",
           "GPU execution time of engine steps, by phase.", _G + ("phase",),
           otel_name="phaselens.phase.busy_time"),
    _agent("phaselens_phase_tokens_total", "counter", "tokens",
           "Tokens processed by engine steps, by step phase and token kind (prefill or decode).",
           _G + ("phase", "kind"), otel_name="phaselens.phase.tokens"),
    _agent("phaselens_step_duration_seconds", "histogram", "seconds",
           "GPU execution time of one engine step, by phase.", _G + ("phase",),
           buckets=STEP_DURATION_BUCKETS_S, otel_name="phaselens.step.duration"),
    _agent("phaselens_attribution_offset_seconds", "gauge", "seconds",
           "Estimated offset between the counter windows and the step timeline.", _G,
           otel_name="phaselens.attribution.offset"),
    _agent("phaselens_sampler_success", "gauge", "",
           "1 if the sampler's last poll succeeded, 0 if it failed.", ("hostname", "sampler"),
           otel_name="phaselens.sampler.success"),
    _agent("phaselens_sampler_duration_seconds", "gauge", "seconds",
           "Duration of the sampler's last poll.", ("hostname", "sampler"),
           otel_name="phaselens.sampler.duration"),
    _agent("phaselens_shim_events_received_total", "counter", "",
           "Step events received from engine phase shims.", ("hostname",),
           otel_name="phaselens.shim.events.received"),
    _agent("phaselens_shim_events_rejected_total", "counter", "",
           "Step events from engine phase shims rejected, by reason (each also logged).",
           ("hostname", "reason"), otel_name="phaselens.shim.events.rejected"),
    # ---- agent additions (not in DESIGN.md's table; documented here and in the report)
    _agent("phaselens_gpu_power_watts", "gauge", "watts", "Latest board power draw.", _G,
           otel_name="hw.power"),
    _agent("phaselens_gpu_sm_clock_hertz", "gauge", "hertz", "Latest SM clock.", _G,
           otel_name="phaselens.gpu.clock.sm"),
    _agent("phaselens_gpu_memory_used_bytes", "gauge", "bytes", "Latest device memory in use.", _G,
           otel_name="hw.gpu.memory.usage"),
    _agent("phaselens_attribution_windows", "gauge", "",
           "Counter windows in the attribution horizon (few windows: estimates missing or uncertain).", _G,
           otel_name="phaselens.attribution.windows"),
    _agent("phaselens_attribution_age_seconds", "gauge", "seconds",
           "Seconds since the GPU's attribution was last published.", _G,
           otel_name="phaselens.attribution.age"),
    # ---- agent health
    _agent("phaselens_agent_info", "gauge", "", "Always 1; the agent's version in a label.",
           ("hostname", "version")),
    _agent("phaselens_agent_started", "gauge", "",
           "1 once the agent finished start-up (GPUs discovered, samplers running), 0 before.", ("hostname",),
           otel_name="phaselens.agent.started"),
    _agent("phaselens_agent_gpus", "gauge", "",
           "GPUs the agent watches (0: no GPU found on this node).", ("hostname",),
           otel_name="phaselens.agent.gpus"),
    _agent("phaselens_agent_samplers_failed", "gauge", "",
           "Samplers whose last poll failed.", ("hostname",), otel_name="phaselens.agent.samplers.failed"),
    _agent("phaselens_sampler_errors_total", "counter", "",
           "Polls of the sampler that failed (lost GPU, NVML error or timeout, exporter down or garbled).",
           ("hostname", "sampler")),
    _agent("phaselens_agent_recorder_failed", "gauge", "",
           "1 if the trace recorder (--record) stopped on a write error (disk full, ...), else 0.",
           ("hostname",)),
    _agent("phaselens_agent_collect_errors_total", "counter", "",
           "Scrapes where reading the agent state failed (the scrape still answers, with health metrics).",
           ("hostname",)),
    # ---- engine (built by engine/ from these specs)
    _engine("phaselens_engine_time_to_first_token_seconds", "histogram", "seconds",
            "Time from request arrival to its first output token.", ENGINE_LABELS,
            buckets=GENAI_TTFT_BUCKETS_S, otel_name="gen_ai.server.time_to_first_token"),
    _engine("phaselens_engine_inter_token_latency_seconds", "histogram", "seconds",
            "Time between consecutive output tokens of a request.", ENGINE_LABELS,
            buckets=GENAI_TPOT_BUCKETS_S, otel_name="gen_ai.server.time_per_output_token"),
    _engine("phaselens_engine_kv_cache_usage_ratio", "gauge", "ratio",
            "Fraction of KV cache blocks in use.", WORKER_LABELS,
            otel_name="phaselens.engine.kv_cache.usage"),
    _engine("phaselens_engine_kv_transfer_seconds", "histogram", "seconds",
            "Time to hand one request's KV cache from a prefill worker to a decode worker (split mode).",
            ENGINE_LABELS, buckets=KV_TRANSFER_BUCKETS_S, otel_name="phaselens.engine.kv_transfer.duration"),
    _engine("phaselens_engine_shim_records_sent_total", "counter", "",
            "Phase-shim step records sent to the node agent's socket.", WORKER_LABELS,
            otel_name="phaselens.engine.shim.sent"),
    _engine("phaselens_engine_shim_records_dropped_total", "counter", "",
            "Phase-shim step records dropped: no agent listening, its queue full, or the send failed.",
            WORKER_LABELS, otel_name="phaselens.engine.shim.dropped"),
    _engine("phaselens_engine_kv_transfer_bytes_total", "counter", "bytes",
            "Bytes of KV cache copied from prefill workers to decode workers (split mode).", ENGINE_LABELS,
            otel_name="phaselens.engine.kv_transfer.size"),
    # engine metrics first proposed in engine/metrics.py (PROPOSED) by the engine's author, moved here as is
    _engine("phaselens_engine_time_per_output_token_seconds", "histogram", "seconds",
            "Per request: (finish - first token) / (output tokens - 1), the TPOT of SLOs.", ENGINE_LABELS,
            buckets=GENAI_TPOT_BUCKETS_S),
    _engine("phaselens_engine_request_duration_seconds", "histogram", "seconds",
            "Time from request arrival to its last token (end-to-end latency).", ENGINE_LABELS,
            buckets=GENAI_REQUEST_DURATION_BUCKETS_S, otel_name="gen_ai.server.request.duration"),
    _engine("phaselens_engine_requests_total", "counter", "",
            "Finished requests by status (ok, error, aborted).", ENGINE_LABELS + ("status",)),
    _engine("phaselens_engine_requests_rejected_total", "counter", "",
            "Requests refused at the door, by reason (bad_request, queue_full, no_worker).",
            ENGINE_LABELS + ("reason",)),
    _engine("phaselens_engine_requests_waiting", "gauge", "",
            "Requests queued in a worker's scheduler, not yet running.", WORKER_LABELS),
    _engine("phaselens_engine_requests_running", "gauge", "",
            "Requests a worker is running (prefilling or decoding).", WORKER_LABELS),
    _engine("phaselens_engine_prefix_cache_hit_ratio", "gauge", "ratio",
            "Prompt tokens served from the prefix cache over prompt tokens looked up, since start.",
            WORKER_LABELS),
    _engine("phaselens_engine_prefix_cache_hit_tokens_total", "counter", "tokens",
            "Prompt tokens served from the prefix cache.", WORKER_LABELS),
    _engine("phaselens_engine_prefix_cache_query_tokens_total", "counter", "tokens",
            "Prompt tokens looked up in the prefix cache.", WORKER_LABELS),
    _engine("phaselens_engine_preemptions_total", "counter", "",
            "Requests preempted because the KV cache ran out.", WORKER_LABELS),
    _engine("phaselens_engine_tokens_total", "counter", "tokens",
            "Tokens processed by engine steps, by step phase and token kind (prefill or decode).",
            WORKER_LABELS + ("phase", "kind")),
    _engine("phaselens_engine_step_duration_seconds", "histogram", "seconds",
            "Duration of one engine step as the worker saw it, by phase.", WORKER_LABELS + ("phase",),
            buckets=STEP_DURATION_BUCKETS_S),
    _engine("phaselens_engine_workers_alive", "gauge", "", "Worker processes alive, by role.",
            ENGINE_LABELS),
    # ---- advisor
    _advisor("phaselens_advisor_goodput_gain_ratio", "gauge", "ratio",
             "Goodput of the recommended split over the best colocated configuration, minus 1.",
             ("model_name",), otel_name="phaselens.advisor.goodput_gain"),
    _advisor("phaselens_advisor_recommended_gpus", "gauge", "gpus",
             "GPUs the advisor recommends per pool (prefill, decode or colocated).", ("model_name", "pool"),
             otel_name="phaselens.advisor.recommended_gpus"),
)

_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def metric(name: str) -> MetricSpec:
    """The spec of the metric exposed as ``name``; KeyError names the unknown metric."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the metric catalogue (exporters/catalogue.py)") from None


def by_producer(producer: str) -> tuple[MetricSpec, ...]:
    """The metrics one producer (``agent``, ``engine`` or ``advisor``) exports."""
    if producer not in PRODUCERS:
        raise ValueError(f"unknown producer {producer!r}; expected one of {', '.join(PRODUCERS)}")
    return tuple(m for m in METRICS if m.producer == producer)


def create(spec: MetricSpec, registry: Any = None, extra_labels: tuple[str, ...] = ()) -> Any:
    """A prometheus_client Gauge/Counter/Histogram for ``spec``, registered on ``registry``.

    ``registry=None`` registers nothing (pass a ``CollectorRegistry``; the default global registry is
    deliberately not used, so tests and several engines in one process do not collide).
    """
    from prometheus_client import Counter, Gauge, Histogram

    # extra labels already in the spec are not repeated (a caller written before the spec gained them)
    labels = list(spec.labels) + [lab for lab in extra_labels if lab not in spec.labels]
    kwargs: dict[str, Any] = {"labelnames": labels, "registry": registry, "unit": spec.unit}
    if spec.type == "gauge":
        return Gauge(spec.base_name, spec.help, **kwargs)
    if spec.type == "counter":
        return Counter(spec.base_name, spec.help, **kwargs)
    if spec.type == "histogram":
        return Histogram(spec.base_name, spec.help, buckets=spec.buckets, **kwargs)
    raise ValueError(f"metric {spec.name!r} has unknown type {spec.type!r}")


def _check() -> None:
    # Invariants checked at import: a catalogue that breaks them is a programming error.
    for m in METRICS:
        assert m.type in TYPES and m.producer in PRODUCERS, m.name
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
        assert not m.unit or m.base_name.endswith("_" + m.unit), m.name
        assert (m.type == "histogram") == bool(m.buckets), m.name
        assert list(m.buckets) == sorted(m.buckets), m.name
    assert len(_BY_NAME) == len(METRICS), "duplicate metric name"


_check()
