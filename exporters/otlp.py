"""OpenTelemetry exporter: the catalogue's meanings as OTel instruments, pushed over OTLP.

Same numbers as the Prometheus exporter, read from the same place: the agent's gauges and counters are
observable instruments whose callbacks read :class:`AgentCollector`'s families (one state snapshot per
collection), so the two exporters cannot disagree. Names and units come from the catalogue's
``otel_name``/``otel_unit`` (DESIGN.md: ``phaselens.phase.utilization``, unit ``1``).

Attributes follow the semantic conventions where one exists: the GPU UUID is ``hw.id`` with
``hw.type="gpu"`` (hardware conventions), the model is ``gen_ai.request.model``, Kubernetes labels are
``k8s.pod.name``/``k8s.namespace.name``/``k8s.container.name``, the host is the resource's ``host.name``.
Everything of our own is under ``phaselens.*``.

Histograms cannot be observed from pre-aggregated counts, so they are recorded as they happen:
:meth:`OtlpExporter.observe_step` (step durations) and :class:`GenAiServerMetrics` (the engine's
``gen_ai.server.time_to_first_token`` / ``time_per_output_token`` with the semantic conventions' advised
bucket boundaries).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from phaselens import __version__
from phaselens.agent.state import AgentState
from phaselens.exporters import catalogue
from phaselens.exporters.catalogue import MetricSpec
from phaselens.exporters.prometheus import AgentCollector
from phaselens.trace import StepRecord

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")

#: Prometheus label -> OTel attribute key. "hostname" goes to the resource (host.name), not to points.
ATTRIBUTE_KEYS: dict[str, str] = {
    "gpu": "phaselens.gpu.index",
    "gpu_uuid": "hw.id",
    "model_name": "gen_ai.request.model",
    "role": "phaselens.role",
    "pod": "k8s.pod.name",
    "namespace": "k8s.namespace.name",
    "container": "k8s.container.name",
    "phase": "phaselens.phase",
    "metric": "phaselens.metric",
    "kind": "phaselens.token.kind",
    "sampler": "phaselens.sampler",
    "reason": "phaselens.reason",
    "version": "service.version",
    "pool": "phaselens.pool",
    "source": "phaselens.source",
}


def attributes(labels: dict[str, str]) -> dict[str, str]:
    """OTel point attributes for a Prometheus label set (empty values dropped; GPU series get hw.type)."""
    out = {ATTRIBUTE_KEYS[k]: v for k, v in labels.items() if k in ATTRIBUTE_KEYS and v != ""}
    if "hw.id" in out:
        out["hw.type"] = "gpu"
    return out


def metrics_endpoint(endpoint: str, protocol: str) -> str:
    """Validate ``endpoint`` for ``protocol``; ValueError names the bad value.

    HTTP: a base URL (``http://collector:4318``) gets the OTLP metrics path ``/v1/metrics`` appended, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` does; a URL with a path is used as it is. gRPC: ``host:port`` or a URL.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown OTLP protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
    if protocol == "http":
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"OTLP/HTTP endpoint {endpoint!r} must be an http:// or https:// URL")
        return endpoint.rstrip("/") + "/v1/metrics" if parsed.path in ("", "/") else endpoint
    if not parsed.hostname or parsed.port is None:
        raise ValueError(f"OTLP/gRPC endpoint {endpoint!r} must be host:port or a URL with a port")
    return endpoint


def _otlp_metric_exporter(endpoint: str, protocol: str, timeout_s: float) -> Any:
    url = metrics_endpoint(endpoint, protocol)
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        return HttpExporter(endpoint=url, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

    insecure = not url.startswith("https://")
    return GrpcExporter(endpoint=url, insecure=insecure, timeout=timeout_s)


class OtlpExporter:
    """The agent's metrics as OTel instruments; pushed over OTLP when an endpoint is configured.

    ``readers`` lets tests add an ``InMemoryMetricReader``; with neither an endpoint nor readers the
    exporter is idle (nothing is collected).
    """

    def __init__(self, state: AgentState, *, endpoint: str | None = None, protocol: str = "http",
                 interval_s: float = 10.0, timeout_s: float = 5.0, readers: Sequence[MetricReader] = ()):
        if interval_s <= 0:
            raise ValueError(f"OTLP export interval must be > 0 s, got {interval_s!r}")
        self.state = state
        self._collector = AgentCollector(state)
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._registered = False
        all_readers = list(readers)
        if endpoint:
            exporter = _otlp_metric_exporter(endpoint, protocol, timeout_s)
            all_readers.append(PeriodicExportingMetricReader(exporter,
                                                             export_interval_millis=interval_s * 1000))
        resource = Resource.create({"service.name": "phaselens-agent", "service.version": __version__,
                                    "host.name": state.hostname})
        self.provider = MeterProvider(resource=resource, metric_readers=all_readers)
        self.meter: Meter = self.provider.get_meter("phaselens.agent", __version__)
        for spec in catalogue.by_producer("agent"):
            if spec.otel_name and spec.type in ("gauge", "counter"):
                self._observe(spec)
        step = catalogue.metric("phaselens_step_duration_seconds")
        self._steps = self.meter.create_histogram(step.otel_name, unit=step.otel_unit, description=step.help,
                                                  explicit_bucket_boundaries_advisory=list(step.buckets))
        if endpoint:  # every step the agent observes from now on (receiver or replay) goes to the histogram
            state.add_step_listener(self.observe_step)

    def _families(self, refresh: bool) -> dict[str, Any]:
        # One snapshot serves every callback of one collection: the SDK runs the callbacks back to back in
        # registration order, and the first registered one refreshes (the 1 s age is a safety net).
        with self._lock:
            now = time.monotonic()
            if refresh or self._cache is None or now - self._cache[0] > 1.0:
                self._cache = (now, {f.name: f for f in self._collector.collect()})
            return self._cache[1]

    def _observe(self, spec: MetricSpec) -> None:
        sample_name = spec.name  # counters: the _total sample
        first = not self._registered
        self._registered = True

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            family = self._families(refresh=first).get(spec.base_name)
            if family is None:
                return []
            return [Observation(s.value, attributes(s.labels))
                    for s in family.samples if s.name == sample_name]

        kwargs: dict[str, Any] = {"callbacks": [callback], "unit": spec.otel_unit, "description": spec.help}
        if spec.type == "gauge":
            self.meter.create_observable_gauge(spec.otel_name, **kwargs)
        else:
            self.meter.create_observable_counter(spec.otel_name, **kwargs)

    def observe_step(self, step: StepRecord, labels: dict[str, str] | None = None) -> None:
        """Record one step's GPU execution time in the step-duration histogram."""
        attrs = attributes({"gpu_uuid": step.gpu_uuid, "role": step.role.value, "phase": step.phase.value,
                            **(labels or {})})
        self._steps.record(step.duration_s, attrs)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export now (where an endpoint is configured); True when every reader succeeded."""
        return bool(self.provider.force_flush(timeout_millis=int(timeout_s * 1000)))

    def shutdown(self) -> None:
        """Final export and stop."""
        self.provider.shutdown()


def from_environment(state: AgentState, environ: Mapping[str, str] | None = None) -> OtlpExporter | None:
    """An exporter configured by the standard OpenTelemetry variables, or None when no endpoint is set.

    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL),
    ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the
    default, or ``grpc``), ``OTEL_METRIC_EXPORT_INTERVAL`` (ms, default 60000, as the specification says).
    A bad value raises ValueError naming the variable and the value.
    """
    env = os.environ if environ is None else environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    proto_var = ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL" if "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL" in env
                 else "OTEL_EXPORTER_OTLP_PROTOCOL")
    proto = env.get(proto_var, "http/protobuf")
    protocol = {"http/protobuf": "http", "grpc": "grpc"}.get(proto)
    if protocol is None:
        raise ValueError(f"{proto_var}={proto!r} is not supported; use http/protobuf or grpc")
    if protocol == "grpc" and "://" in endpoint:
        endpoint = endpoint.split("://", 1)[1].rstrip("/")
    raw_interval = env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    try:
        interval_s = float(raw_interval) / 1000.0
    except ValueError:
        interval_s = -1.0
    if not interval_s > 0:
        raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL={raw_interval!r} is not a positive number of ms")
    try:
        return OtlpExporter(state, endpoint=endpoint, protocol=protocol, interval_s=interval_s)
    except ValueError as exc:
        raise ValueError(f"OTLP endpoint from the environment: {exc}") from None


class GenAiServerMetrics:
    """The engine's latency histograms under the GenAI semantic conventions' names and buckets.

    The engine records each request's TTFT and each gap between output tokens here as it does into its
    Prometheus histograms (same catalogue specs: ``phaselens_engine_time_to_first_token_seconds`` ...).
    """

    def __init__(self, meter: Meter):
        ttft = catalogue.metric("phaselens_engine_time_to_first_token_seconds")
        itl = catalogue.metric("phaselens_engine_inter_token_latency_seconds")
        kv = catalogue.metric("phaselens_engine_kv_transfer_seconds")
        self._ttft = meter.create_histogram(ttft.otel_name, unit=ttft.otel_unit, description=ttft.help,
                                            explicit_bucket_boundaries_advisory=list(ttft.buckets))
        self._tpot = meter.create_histogram(itl.otel_name, unit=itl.otel_unit, description=itl.help,
                                            explicit_bucket_boundaries_advisory=list(itl.buckets))
        self._kv = meter.create_histogram(kv.otel_name, unit=kv.otel_unit, description=kv.help,
                                          explicit_bucket_boundaries_advisory=list(kv.buckets))

    @staticmethod
    def _attrs(model_name: str, role: str) -> dict[str, str]:
        out = attributes({"model_name": model_name, "role": role})
        out["gen_ai.operation.name"] = "text_completion"
        return out

    def time_to_first_token(self, seconds: float, model_name: str, role: str) -> None:
        self._ttft.record(seconds, self._attrs(model_name, role))

    def time_per_output_token(self, seconds: float, model_name: str, role: str) -> None:
        self._tpot.record(seconds, self._attrs(model_name, role))

    def kv_transfer(self, seconds: float, model_name: str) -> None:
        self._kv.record(seconds, attributes({"model_name": model_name}))
