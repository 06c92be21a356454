"""The agent killed (SIGKILL) and restarted while the engine serves: the engine does not notice (every
request succeeds), and the new agent resumes the per-phase attribution within one horizon of starting.
Then the agent hangs (SIGSTOP) with its socket bound: the engine still serves every request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.engine.server_harness import LiveServer, tiny_workers
from tests.faults.agent_process import AgentProcess
from tests.faults.helpers import parse_exposition, value, wait_for

HORIZON_S = 5.0


def _attributing(agent: AgentProcess) -> bool:
    """The agent has received steps from the engine and published a per-phase time split for its GPU."""
    try:
        m = agent.metrics()
        return value(m, "phaselens_shim_events_received_total") > 0 and \
            value(m, "phaselens_phase_time_ratio", gpu_uuid="GPU-sim-0", phase="decode") > 0
    except (KeyError, httpx.HTTPError):
        return False


@pytest.mark.slow
def test_agent_killed_and_restarted_while_the_engine_serves(tmp_path: Path) -> None:
    sock = tmp_path / "phaselens.sock"
    workers = tiny_workers(1, shim_enabled=True, shim_socket_path=str(sock))
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    agent = AgentProcess(sock, horizon_s=HORIZON_S)
    with LiveServer(workers) as srv:

        def load() -> None:
            body = {"model": "tiny", "prompt": "the agent may die", "max_tokens": 8, "ignore_eos": True}
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    try:
                        r = client.post(f"{srv.url}/v1/completions", json=body)
                        statuses.append(r.status_code)
                        if r.status_code != 200:
                            errors.append(r.text)
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

        loader = threading.Thread(target=load, daemon=True)
        try:
            agent.start()
            loader.start()
            wait_for(lambda: _attributing(agent), 60, "the first agent to attribute")
            served_before_kill = len(statuses)
            agent.kill()
            assert sock.exists()  # SIGKILL leaves the stale socket behind, as a crash would
            # the engine serves on without its agent
            wait_for(lambda: len(statuses) >= served_before_kill + 5, 60, "requests served with no agent")
            health = httpx.get(f"{srv.url}/health", timeout=10).json()
            assert health["status"] == "ok"
            # a new agent (the DaemonSet restarts the pod) replaces the stale socket and resumes
            agent = AgentProcess(sock, horizon_s=HORIZON_S)
            agent.start()
            started = time.monotonic()
            wait_for(lambda: _attributing(agent), HORIZON_S,
                     "the restarted agent to attribute within one horizon")
            resumed_s = time.monotonic() - started
            served_after = len(statuses)
            wait_for(lambda: len(statuses) >= served_after + 3, 60, "requests served after the restart")
            # the agent hangs (SIGSTOP: socket bound, nobody reading, its queue fills): the engine serves on
            agent.pause()
            try:
                served_hung = len(statuses)
                wait_for(lambda: len(statuses) >= served_hung + 5, 60, "requests served with a hung agent")
            finally:
                agent.resume()
            received = value(agent.metrics(), "phaselens_shim_events_received_total")
            wait_for(lambda: value(agent.metrics(), "phaselens_shim_events_received_total") > received, 30,
                     "the resumed agent to receive steps again")
        finally:
            stop.set()
            loader.join(60)
            agent.stop()
        engine_metrics = parse_exposition(httpx.get(f"{srv.url}/metrics", timeout=10).text)
    assert errors == [] and statuses and set(statuses) == {200}, errors[:3]
    failed = [v for (n, ls), v in engine_metrics.items()
              if n == "phaselens_engine_requests_total" and ("status", "ok") not in ls and v > 0]
    assert failed == []
    print(f"agent restart: attribution resumed {resumed_s:.2f} s after the new agent served; "
          f"{len(statuses)} requests, all 200")


def test_the_engine_shows_a_missing_agent_in_its_metrics(tmp_path: Path) -> None:
    workers = tiny_workers(1, shim_enabled=True, shim_socket_path=str(tmp_path / "nobody-here.sock"))
    with LiveServer(workers) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "no agent", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200  # the engine serves without its agent
        metrics = parse_exposition(httpx.get(f"{srv.url}/metrics", timeout=10).text)
    dropped = [v for (name, _), v in metrics.items() if "shim" in name and "drop" in name]
    assert dropped and sum(dropped) > 0
