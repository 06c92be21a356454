"""The daemon loop end to end (simulated and fake-NVML sources), its HTTP endpoints, and the commands."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from phaselens.agent.daemon import AgentConfig, AgentDaemon, build_daemon, make_http_server
from phaselens.agent.receiver import PhaseReceiver
from phaselens.agent.samplers.simulated import H100_SIGNATURES, SimulatedGpuModel, SimulatedSampler
from phaselens.agent.state import AgentState, GpuIdentity
from phaselens.agent.timeline import Timeline
from phaselens.cli import cli
from phaselens.phase import Phase
from phaselens.trace import dumps, read_trace
from tests.agent.fake_nvml import FakeGpu, FakeNvml
from tests.agent.sim_helpers import T0, FakeClock, engine_like_steps, step

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "attribution"


def test_tick_sample_timeline_attribute_publish_with_simulated_counters(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    state = AgentState("node-a")
    timeline = Timeline(horizon_s=30)
    uuid = "GPU-sim-0"
    sampler = SimulatedSampler([uuid], timeline, model=SimulatedGpuModel(glitch_rate=0.0), clock=clock)
    rx = PhaseReceiver(tmp_path / "s.sock", state, timeline, known_gpus={uuid}, clock=clock)
    cfg = AgentConfig(source="simulated", horizon_s=30, attribute_interval_s=5.0)
    daemon = AgentDaemon(cfg, state, timeline, [(sampler, 10.0)], [GpuIdentity(uuid, 0, "simulated")], rx,
                         clock=clock)
    steps = iter(engine_like_steps(uuid, 25.0, seed=7))
    pending = next(steps)
    for _ in range(2500):  # 25 s of 10 ms ticks; steps arrive when they end, as from the shim
        while pending is not None and pending.t1_ns <= clock.t:
            assert rx.handle(dumps(pending).encode())
            pending = next(steps, None)
        daemon.tick()
        clock.t += 10_000_000
    snap = state.snapshot()
    result = snap.attribution[uuid]
    assert result.windows >= 150 and result.alignment_offset_s is not None
    for phase in Phase.busy():
        for key in ("sm_active", "tensor_active", "dram_active"):
            assert result.phases[phase].values[key] == pytest.approx(H100_SIGNATURES[phase][key], abs=0.03)
    assert snap.samplers["simulated"].success
    assert snap.busy_seconds[(uuid, Phase.DECODE)] > 5

    server = make_http_server(state, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        state.mark_started()
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'phaselens_phase_utilization_ratio{' in text and 'phase="mixed"' in text
        assert 'reason="rate_limited"' in text  # every rejection reason exported from the start
        health = json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())
        assert health["status"] == "ok" and health["gpus"] == [uuid]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert err.value.code == 404
    finally:
        server.shutdown()


def test_gpm_source_with_fake_nvml_survives_a_lost_gpu(tmp_path: Path) -> None:
    a, b = FakeGpu("GPU-a", refresh_polls=1), FakeGpu("GPU-b", refresh_polls=1)
    cfg = AgentConfig(source="gpm", socket_path=str(tmp_path / "s.sock"), nvml_interval_ms=10)
    daemon = build_daemon(cfg, nvml=FakeNvml([a, b]))
    assert sorted(daemon.gpus) == ["GPU-a", "GPU-b"] and daemon.receiver.known_gpus == {"GPU-a", "GPU-b"}
    t = T0
    for _ in range(3):
        daemon.tick(t)
        t += 20_000_000
    assert daemon.state.snapshot().samplers["gpm"].success
    a.lost = True
    daemon.tick(t)
    snap = daemon.state.snapshot()
    assert not snap.samplers["gpm"].success and "GPU-a" in snap.samplers["gpm"].last_error
    assert snap.raw["GPU-b"]["sm_active"] == pytest.approx(0.967)
    from phaselens.agent.daemon import health

    code, body = health(daemon.state)
    assert code == 503 and body["status"] in ("degraded", "starting")
    with pytest.raises(ValueError, match="GPU-zzz"):
        build_daemon(AgentConfig(source="gpm", gpus=["GPU-zzz"], socket_path=str(tmp_path / "t.sock")),
                     nvml=FakeNvml([FakeGpu("GPU-c")]))


# ------------------------------------------------------------------ commands


def test_agent_flags_are_validated_with_the_bad_value_named(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["agent", "--poll-interval-ms", "0"])
    assert r.exit_code == 2 and "0" in r.output and "--poll-interval-ms" in r.output
    r = runner.invoke(cli, ["agent", "--source", "magic"])
    assert r.exit_code == 2 and "magic" in r.output
    r = runner.invoke(cli, ["agent", "--source", "replay"])
    assert r.exit_code == 2 and "--replay-trace" in r.output
    r = runner.invoke(cli, ["agent", "--horizon-s", "-3"])
    assert r.exit_code == 2 and "-3" in r.output
    r = runner.invoke(cli, ["agent", "--source", "simulated", "--port", "70000"])
    assert r.exit_code == 2 and "70000" in r.output
    r = runner.invoke(cli, ["agent", "--source", "dcgm", "--dcgm-url", "localhost:9400"])
    assert r.exit_code == 2 and "localhost:9400" in r.output
    r = runner.invoke(cli, ["agent"], env={"PHASELENS_POLL_INTERVAL_MS": "fast"})
    assert r.exit_code == 2 and "fast" in r.output
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n{}\n")
    r = runner.invoke(cli, ["agent", "--source", "replay", "--replay-trace", str(junk)])
    assert r.exit_code == 2 and "holds no step or sample records to replay (2 malformed lines)" in r.output
    r = runner.invoke(cli, ["agent", "--source", "dcgm", "--dcgm-url", "http://"])
    assert r.exit_code == 2 and "'http://' is not an http(s) URL with a host" in r.output
    r = runner.invoke(cli, ["agent", "--source", "simulated", "--listen-address", "999.1.1.1"])
    assert r.exit_code == 2 and "--listen-address" in r.output and "999.1.1.1" in r.output
    # nan passes every range comparison; it is refused by name, as an unbounded inf is
    for flag, value in [("--attribute-interval-s", "nan"), ("--replay-speed", "nan"), ("--horizon-s", "nan")]:
        r = runner.invoke(cli, ["agent", "--source", "simulated", flag, value])
        assert r.exit_code == 2 and f"'{value}' is not a finite number" in r.output and flag in r.output
    out = str(tmp_path / "t.jsonl")
    r = runner.invoke(cli, ["record", out, "--source", "simulated", "--duration-s", "inf"])
    assert r.exit_code == 2 and "'inf' is not a finite number" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_agent_socket_that_cannot_be_bound_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("x")
    r = CliRunner().invoke(cli, ["agent", "--source", "simulated", "--socket-path", str(blocker),
                                 "--port", "0"])
    assert r.exit_code == 2 and "not a socket" in r.output and "Traceback" not in r.output
    assert blocker.read_text() == "x"


def test_attribute_command_prints_table_and_json() -> None:
    runner = CliRunner()
    trace = str(FIXTURES / "regime_medium.jsonl")
    r = runner.invoke(cli, ["attribute", trace])
    assert r.exit_code == 0, r.output
    assert "prefill" in r.output and "tensor_active" in r.output and "method=unmix" in r.output
    r = runner.invoke(cli, ["attribute", trace, "--json", "--method", "naive"])
    doc = json.loads(r.output)
    (gpu,) = doc["gpus"].values()
    assert gpu["method"] == "naive" and set(gpu["phases"]) >= {"prefill", "decode", "mixed", "idle"}


def test_attribute_command_on_bad_files(tmp_path: Path) -> None:
    runner = CliRunner()
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n{\"type\": \"step\"}\n")
    r = runner.invoke(cli, ["attribute", str(junk)])
    assert r.exit_code == 2 and "no step or sample records" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["attribute", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "missing.jsonl" in r.output


def test_record_with_simulated_source_writes_a_trace(tmp_path: Path) -> None:
    out = tmp_path / "trace.jsonl"
    sock_path = tmp_path / "s.sock"

    def send_steps() -> None:  # as the shim would, once the recorder's socket exists
        import socket as socket_mod
        import time

        deadline = time.monotonic() + 10
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM) as s:
            for i in range(3):
                t = time.time_ns()
                s.sendto(dumps(step("GPU-sim-0", Phase.DECODE, t - 5_000_000, t, i)).encode(), str(sock_path))

    sender = threading.Thread(target=send_steps)
    sender.start()
    r = CliRunner().invoke(cli, ["record", str(out), "--source", "simulated", "--duration-s", "1.0",
                                 "--socket-path", str(sock_path), "--poll-interval-ms", "10"])
    sender.join()
    assert r.exit_code == 0, r.output
    trace = read_trace(out)
    assert [s.step for s in trace.steps] == [0, 1, 2]
    assert trace.meta is not None and trace.meta.gpus[0].uuid == "GPU-sim-0"
    assert len(trace.samples) >= 10 and all(s.source == "simulated" for s in trace.samples)
    assert trace.malformed == 0


def test_every_gpu_series_says_where_its_counters_come_from(tmp_path: Path) -> None:
    """The per-GPU series carry ``source``: ``simulated`` for the simulated source and for a replayed trace of
    simulated counters, so that no query mistakes generated data for a real GPU; ``replay`` for a replayed
    recording of real counters."""
    from prometheus_client import generate_latest

    from phaselens.exporters.prometheus import agent_registry

    def exposition(daemon: AgentDaemon) -> list[str]:
        daemon.tick()
        return [line for line in generate_latest(agent_registry(daemon.state)).decode().splitlines()
                if "gpu_uuid=" in line]

    sim = build_daemon(AgentConfig(source="simulated", attribute_interval_s=0.1), with_receiver=False)
    lines = exposition(sim)
    assert lines and all('source="simulated"' in line for line in lines)

    real = Path(__file__).parents[1] / "fixtures" / "attribution" / "regime_short.jsonl"
    lines = exposition(build_daemon(AgentConfig(source="replay", replay_trace=str(real))))
    assert lines and all('source="replay"' in line for line in lines)

    uuid = "GPU-sim-0"
    simulated_trace = tmp_path / "sim.jsonl"
    simulated_trace.write_text("\n".join([
        json.dumps({"type": "meta", "version": 1, "host": "h", "gpus": [{"uuid": uuid, "index": 0,
                                                                         "name": "simulated"}]}),
        dumps(step(uuid, Phase.DECODE, T0, T0 + 10_000_000, 0)),
        json.dumps({"type": "sample", "gpu_uuid": uuid, "source": "simulated", "t_ns": T0 + 5_000_000,
                    "values": {"sm_active": 0.5}}),
    ]) + "\n")
    replayed = build_daemon(AgentConfig(source="replay", replay_trace=str(simulated_trace)))
    assert replayed.state.snapshot().gpus[uuid].source == "simulated"
    assert replayed.source_label == "simulated"


def test_otlp_sdk_is_needed_only_when_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an OTLP endpoint the agent starts even where the OpenTelemetry SDK is not installed (found on
    the GPU machine); with one, the missing SDK is a usage error, not a traceback."""
    import sys

    import click

    from phaselens.agent.commands import _otlp

    monkeypatch.setitem(sys.modules, "phaselens.exporters.otlp", None)  # any import of it fails
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", raising=False)
    daemon = build_daemon(AgentConfig(source="simulated"), with_receiver=False)
    assert _otlp(daemon) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    with pytest.raises(click.UsageError, match="OTLP export"):
        _otlp(daemon)
