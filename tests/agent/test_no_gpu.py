"""No driver, no GPU: the agent stays up, answers scrapes with its health set, and retries; --record works."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from phaselens.agent.daemon import AgentConfig, build_daemon, make_http_server
from phaselens.agent.samplers.deferred import DeferredSampler
from phaselens.trace import TraceWriter, read_trace
from tests.agent.fake_nvml import FakeGpu, FakeNvml, NVMLError


class DriverNotLoaded(FakeNvml):
    """NVML whose init fails until ``loaded`` is set, as on a node whose driver comes up after the agent."""

    def __init__(self, gpus: list[FakeGpu]):
        super().__init__(gpus)
        self.loaded = False

    def nvmlInit(self) -> None:
        if not self.loaded:
            raise NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED
        super().nvmlInit()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_agent_without_driver_serves_health_and_recovers(tmp_path: Path) -> None:
    nvml = DriverNotLoaded([FakeGpu(uuid="GPU-aaaa")])
    daemon = build_daemon(AgentConfig(source="gpm", socket_path=str(tmp_path / "s.sock")), nvml=nvml)
    deferred = [s.sampler for s in daemon.samplers]
    assert all(isinstance(s, DeferredSampler) for s in deferred) and len(deferred) == 2
    server = make_http_server(daemon.state, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        daemon.state.mark_started()
        now = time.time_ns()
        daemon.tick(now)
        code, text = _get(base + "/metrics")
        assert code == 200
        assert 'phaselens_sampler_success{hostname=' in text and 'sampler="gpm"} 0.0' in text
        code, body = _get(base + "/health")
        assert code == 503 and "degraded" in body and "cannot start" in body
        # the driver comes up; the next retry starts the real samplers
        nvml.loaded = True
        for s in deferred:
            s._next_try = 0.0
        daemon.tick(now + 2_000_000_000)  # both samplers due again
        assert all(s.inner is not None for s in deferred)
        assert daemon.state.snapshot().samplers["nvml"].success
    finally:
        server.shutdown()
        daemon.close()


def test_record_to_writes_meta_steps_and_samples(tmp_path: Path) -> None:
    cfg = AgentConfig(source="simulated", socket_path=str(tmp_path / "s.sock"))
    daemon = build_daemon(cfg)
    path = tmp_path / "trace.jsonl"
    daemon.record_to(TraceWriter(path))
    for _ in range(3):
        daemon.tick()
    daemon.close()
    trace = read_trace(path)
    assert trace.meta is not None and [g.uuid for g in trace.meta.gpus] == ["GPU-sim-0"]
    assert trace.malformed == 0
