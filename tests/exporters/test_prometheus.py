"""The agent's /metrics: health during start-up, without GPUs and with a failed sampler; promtool clean."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from phaselens.agent.state import AgentState, SamplerHealth
from phaselens.exporters.prometheus import agent_registry
from phaselens.phase import Phase
from tests.exporters.states import GPU0, full_state


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(state: AgentState) -> tuple[int, str]:
    """Serve the agent registry over real HTTP on a free port and scrape it once."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=agent_registry(state))
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.status, resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_during_start_up_answers_200_with_started_0() -> None:
    status, text = _scrape(AgentState("node-a"))
    assert status == 200
    v = _values(text)
    assert v[("phaselens_agent_started", (("hostname", "node-a"),))] == 0
    assert v[("phaselens_agent_gpus", (("hostname", "node-a"),))] == 0
    assert not [k for k in v if k[0].startswith("phaselens_phase_")]


def test_scrape_without_gpu_reports_zero_gpus() -> None:
    state = AgentState("node-a")
    state.sampler_result(SamplerHealth("nvml", False, 0.0, last_error="NVML Shared Library Not Found"))
    state.mark_started()
    status, text = _scrape(state)
    assert status == 200
    v = _values(text)
    assert v[("phaselens_agent_started", (("hostname", "node-a"),))] == 1
    assert v[("phaselens_agent_gpus", (("hostname", "node-a"),))] == 0
    assert v[("phaselens_sampler_success", (("hostname", "node-a"), ("sampler", "nvml")))] == 0


def test_failed_sampler_is_reported_and_the_rest_still_exported() -> None:
    status, text = _scrape(full_state())
    assert status == 200
    v = _values(text)
    assert v[("phaselens_sampler_success", (("hostname", "node-a"), ("sampler", "gpm")))] == 0
    assert v[("phaselens_sampler_success", (("hostname", "node-a"), ("sampler", "nvml")))] == 1
    assert v[("phaselens_agent_samplers_failed", (("hostname", "node-a"),))] == 1
    assert any(k[0] == "phaselens_phase_utilization_ratio" for k in v)


def test_state_read_failure_still_answers_with_health(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(AgentState):
        def snapshot(self) -> Any:
            raise RuntimeError("state torn")

    status, text = _scrape(Broken("node-a"))
    assert status == 200
    v = _values(text)
    assert v[("phaselens_agent_collect_errors_total", (("hostname", "node-a"),))] == 1
    assert v[("phaselens_agent_started", (("hostname", "node-a"),))] == 0
    assert "state torn" in caplog.text


def test_values_match_the_state() -> None:
    state = full_state()
    snap = state.snapshot()
    v = _values(generate_latest(agent_registry(state)).decode())
    labels = dict(hostname="node-a", gpu="0", gpu_uuid=GPU0.uuid, model_name="tiny", role="colocated",
                  pod="engine-0", namespace="llm", container="engine", source="gpm")
    key = tuple(sorted({**labels, "phase": "prefill", "metric": "dram_active"}.items()))
    assert v[("phaselens_phase_utilization_ratio", key)] == 0.3
    idle = tuple(sorted({**labels, "phase": "idle"}.items()))
    assert v[("phaselens_phase_time_ratio", idle)] == 0.15
    hist = snap.step_durations[(GPU0.uuid, Phase.PREFILL)]
    inf = tuple(sorted({**labels, "phase": "prefill", "le": "+Inf"}.items()))
    assert v[("phaselens_step_duration_seconds_bucket", inf)] == hist.count == 6
    le016 = tuple(sorted({**labels, "phase": "prefill", "le": "0.16"}.items()))
    assert v[("phaselens_step_duration_seconds_bucket", le016)] == 6  # 150 ms steps


def test_concurrent_writes_and_scrapes() -> None:
    state = full_state()
    registry = agent_registry(state)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            state.count_received()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(20):
            list(text_string_to_metric_families(generate_latest(registry).decode()))
    finally:
        stop.set()
        t.join()


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (bash deploy/install-test-deps.sh installs it as root)")
@pytest.mark.parametrize("make_state", [full_state, lambda: AgentState("node-a")], ids=["full", "start-up"])
def test_promtool_check_metrics_is_clean(make_state: Any) -> None:
    text = generate_latest(agent_registry(make_state()))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.stdout.decode() + proc.stderr.decode())


def test_known_rejection_reasons_start_at_zero() -> None:
    state = AgentState("node-a")
    state.count_rejected("malformed", 3)
    v = _values(generate_latest(agent_registry(state, rejection_reasons=("malformed", "oversize"))).decode())
    assert v[("phaselens_shim_events_rejected_total", (("hostname", "node-a"), ("reason", "malformed")))] == 3
    assert v[("phaselens_shim_events_rejected_total", (("hostname", "node-a"), ("reason", "oversize")))] == 0
