"""OTLP exporter: names, units and attributes (in-memory reader), and real OTLP/HTTP and gRPC pushes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from phaselens.exporters import catalogue
from phaselens.exporters.otlp import (GenAiServerMetrics, OtlpExporter, from_environment,
                                      metrics_endpoint)
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import StepRecord
from tests.exporters.states import GPU0, full_state


def _points(reader: InMemoryMetricReader) -> dict[str, tuple[str, list[Any]]]:
    data = reader.get_metrics_data()
    out: dict[str, tuple[str, list[Any]]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = (m.unit, list(m.data.data_points))
    return out


def test_in_memory_names_units_attributes_and_values() -> None:
    state = full_state()
    reader = InMemoryMetricReader()
    exporter = OtlpExporter(state, readers=[reader])
    exporter.observe_step(StepRecord(GPU0.uuid, "e0", Role.COLOCATED, Phase.DECODE, 1, 0, 30_000_000,
                                     Clock.GPU, 0, 8, 8, 800, 1.0, 1.0))
    points = _points(reader)
    for spec in catalogue.by_producer("agent"):
        if spec.otel_name:
            assert spec.otel_name in points, spec.otel_name
            assert points[spec.otel_name][0] == spec.otel_unit, spec.otel_name
    unit, util = points["phaselens.phase.utilization"]
    assert unit == "1"
    tensor_prefill = [p for p in util if p.attributes["hw.id"] == GPU0.uuid
                      and p.attributes["phaselens.phase"] == "prefill"
                      and p.attributes["phaselens.metric"] == "tensor_active"]
    snap = state.snapshot()
    assert len(tensor_prefill) == 1
    expected = snap.attribution[GPU0.uuid].phases[Phase.PREFILL].values["tensor_active"]
    assert tensor_prefill[0].value == expected
    attrs = tensor_prefill[0].attributes
    assert attrs["hw.type"] == "gpu" and attrs["gen_ai.request.model"] == "tiny"
    assert attrs["k8s.pod.name"] == "engine-0" and attrs["phaselens.gpu.index"] == "0"
    # Counters carry the cumulative value of the state.
    busy = {(p.attributes["hw.id"], p.attributes["phaselens.phase"]): p.value
            for p in points["phaselens.phase.busy_time"][1]}
    assert busy[(GPU0.uuid, "decode")] == pytest.approx(snap.busy_seconds[(GPU0.uuid, Phase.DECODE)])
    # The step histogram uses the catalogue's bounds.
    (hist,) = points["phaselens.step.duration"][1]
    assert tuple(hist.explicit_bounds) == catalogue.STEP_DURATION_BUCKETS_S
    assert hist.count == 1 and hist.sum == pytest.approx(0.03)
    # No GPU attributes leak onto host-level series; the host is on the resource.
    received = points["phaselens.shim.events.received"][1]
    assert received[0].value == 12 and dict(received[0].attributes) == {}
    resource = reader.get_metrics_data().resource_metrics[0].resource.attributes
    assert resource["host.name"] == "node-a" and resource["service.name"] == "phaselens-agent"
    exporter.shutdown()


def test_values_follow_the_state_between_collections() -> None:
    state = full_state()
    reader = InMemoryMetricReader()
    OtlpExporter(state, readers=[reader])
    before = _points(reader)["phaselens.shim.events.received"][1][0].value
    state.count_received(5)
    after = _points(reader)["phaselens.shim.events.received"][1][0].value
    assert after == before + 5


def test_genai_histograms_use_semantic_convention_buckets() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    genai = GenAiServerMetrics(provider.get_meter("test"))
    genai.time_to_first_token(0.07, "tiny", "colocated")
    genai.time_per_output_token(0.012, "tiny", "decode")
    genai.kv_transfer(0.003, "tiny")
    points = _points(reader)
    unit, (ttft,) = points["gen_ai.server.time_to_first_token"]
    assert unit == "s"
    assert tuple(ttft.explicit_bounds) == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                           1.0, 2.5, 5.0, 7.5, 10.0)
    assert ttft.attributes["gen_ai.request.model"] == "tiny" and ttft.sum == pytest.approx(0.07)
    _, (tpot,) = points["gen_ai.server.time_per_output_token"]
    assert tuple(tpot.explicit_bounds) == (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                           2.5)
    assert tpot.attributes["phaselens.role"] == "decode"
    assert "phaselens.engine.kv_transfer.duration" in points


@pytest.mark.parametrize("endpoint, protocol, message", [
    ("collector:4318", "http", "must be an http"),
    ("http://collector:4318", "thrift", "unknown OTLP protocol 'thrift'"),
    ("collector", "grpc", "must be host:port"),
])
def test_bad_endpoint_is_a_clear_error(endpoint: str, protocol: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics_endpoint(endpoint, protocol)


def test_http_base_url_gets_the_metrics_path() -> None:
    assert metrics_endpoint("http://c:4318", "http") == "http://c:4318/v1/metrics"
    assert metrics_endpoint("http://c:4318/custom", "http") == "http://c:4318/custom"


def _decoded_names(request: metrics_service_pb2.ExportMetricsServiceRequest) -> dict[str, Any]:
    out = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[metrics_service_pb2.ExportMetricsServiceRequest]]]:
    received: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/metrics" and self.headers["Content-Type"] == "application/x-protobuf":
                req = metrics_service_pb2.ExportMetricsServiceRequest()
                req.ParseFromString(body)
                received.append(req)
                self.send_response(200)
            else:
                self.send_response(400)
            payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_otlp_http_push_is_decoded_by_a_local_receiver(http_receiver: Any) -> None:
    url, received = http_receiver
    exporter = OtlpExporter(full_state(), endpoint=url, protocol="http", interval_s=3600)
    assert exporter.flush(timeout_s=10)
    exporter.shutdown()
    assert received, "the receiver got no OTLP request"
    names = _decoded_names(received[0])
    util = names["phaselens.phase.utilization"]
    assert util.unit == "1"
    attrs = {kv.key: kv.value.string_value for kv in util.gauge.data_points[0].attributes}
    assert attrs["hw.type"] == "gpu" and attrs["hw.id"].startswith("GPU-")
    busy = names["phaselens.phase.busy_time"]
    assert busy.sum.is_monotonic and busy.unit == "s"
    resource = {kv.key: kv.value.string_value for kv in received[0].resource_metrics[0].resource.attributes}
    assert resource["host.name"] == "node-a"


def test_otlp_grpc_push_is_decoded_by_a_local_receiver() -> None:
    grpc = pytest.importorskip("grpc")
    received: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - generated name
            received.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        exporter = OtlpExporter(full_state(), endpoint=f"127.0.0.1:{port}", protocol="grpc", interval_s=3600)
        assert exporter.flush(timeout_s=10)
        exporter.shutdown()
    finally:
        server.stop(grace=None)
    assert received
    names = _decoded_names(received[0])
    assert names["phaselens.phase.time"].unit == "1"
    assert names["hw.power"].unit == "W"


def test_from_environment(http_receiver: Any) -> None:
    url, received = http_receiver
    assert from_environment(full_state(), {}) is None
    exporter = from_environment(full_state(), {"OTEL_EXPORTER_OTLP_ENDPOINT": url,
                                               "OTEL_METRIC_EXPORT_INTERVAL": "3600000"})
    assert exporter is not None and exporter.flush(timeout_s=10)
    exporter.shutdown()
    assert "phaselens.phase.utilization" in _decoded_names(received[0])
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        from_environment(full_state(), {"OTEL_EXPORTER_OTLP_ENDPOINT": url,
                                        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ValueError, match="OTEL_METRIC_EXPORT_INTERVAL='soon'"):
        from_environment(full_state(), {"OTEL_EXPORTER_OTLP_ENDPOINT": url,
                                        "OTEL_METRIC_EXPORT_INTERVAL": "soon"})


def test_agent_pushes_over_otlp_when_the_environment_names_an_endpoint(http_receiver: Any) -> None:
    """``phaselens agent`` wires the exporter in: with OTEL_EXPORTER_OTLP_ENDPOINT set, a running agent pushes
    its per-phase gauges and the step-duration histogram of the steps it sees; a bad protocol is a usage
    error naming the variable."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    url, received = http_receiver
    trace = Path(__file__).parents[1] / "fixtures" / "attribution" / "regime_8b.jsonl"
    args = [sys.executable, "-m", "phaselens", "agent", "--source", "replay", "--replay-trace", str(trace),
            "--replay-speed", "5", "--attribute-interval-s", "0.5", "--listen-address", "127.0.0.1",
            "--port", "0"]
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_METRIC_EXPORT_INTERVAL="300")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        names: dict[str, Any] = {}
        while not {"phaselens.phase.utilization", "phaselens.step.duration"} <= set(names):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, sorted(names)
            for req in list(received):
                names.update(_decoded_names(req))
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    steps = names["phaselens.step.duration"].histogram.data_points
    assert sum(p.count for p in steps) > 0
    assert {kv.key for kv in steps[0].attributes} >= {"hw.id", "phaselens.phase"}
    bad = subprocess.run(args, env=dict(env, OTEL_EXPORTER_OTLP_PROTOCOL="http/json"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'" in bad.stderr, bad.stderr
