"""Disk full for the trace recorder: recording stops with a logged error and a health metric; nothing
else does (the receiver keeps accepting steps, samplers keep sampling, the attribution keeps publishing)."""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from pathlib import Path

import pytest

from phaselens.agent.daemon import AgentConfig, build_daemon, health
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.emitter import PhaseEmitter
from phaselens.trace import StepRecord, TraceWriter
from tests.faults.helpers import scrape, value, wait_for


class _FillingDisk(io.StringIO):
    """A text file on a disk that fills up: once ``room`` characters are written, every write raises ENOSPC
    (what write(2) on a full filesystem does)."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, s: str) -> int:
        if self.tell() + len(s) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(s)


def _step(n: int, uuid: str = "GPU-sim-0") -> StepRecord:
    t1 = time.time_ns()
    return StepRecord(uuid, "e0", Role.COLOCATED, Phase.DECODE if n % 4 else Phase.PREFILL, n, t1 - 5_000_000,
                      t1, Clock.HOST, 0 if n % 4 else 64, 4 if n % 4 else 0, 4, 100 + n, 1e9, 1e8)


@pytest.mark.parametrize("target", ["/dev/full", "enospc"])
def test_disk_full_stops_recording_only(tmp_path: Path, target: str, caplog) -> None:
    if target == "/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    sock = tmp_path / "agent.sock"
    cfg = AgentConfig(source="simulated", socket_path=str(sock), hostname="node-d", horizon_s=10,
                      attribute_interval_s=0.2)
    daemon = build_daemon(cfg)
    writer = TraceWriter(target if target == "/dev/full" else _FillingDisk(room=4000))
    caplog.set_level(logging.WARNING)
    # /dev/full takes the meta record into the write buffer; the failure comes with the first flush
    daemon.record_to(writer)
    daemon.start_receiver()
    emitter = PhaseEmitter(str(sock))
    try:
        sent = 0

        def send_and_tick(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                emitter.emit(_step(sent))
                sent += 1
            daemon.tick()

        # enough records to overflow any write buffer (8 KiB): the disk-full error surfaces
        for _ in range(40):
            send_and_tick(20)
        wait_for(lambda: daemon.state.snapshot().recorder_error, 10, "the recorder to fail")
        assert daemon.recorder is None
        errors = [r for r in caplog.records if "trace recorder stopped" in r.getMessage()]
        assert len(errors) == 1 and errors[0].levelno == logging.ERROR
        assert "No space left" in errors[0].getMessage()
        received = daemon.state.snapshot().shim_received

        # everything else goes on: the receiver accepts, samplers sample, the attribution publishes
        for _ in range(20):
            send_and_tick(10)
            time.sleep(0.01)
        snap = wait_for(lambda: (s := daemon.state.snapshot()).shim_received >= received + 200 and s, 10,
                        "steps after the failure")
        assert snap.shim_rejected == {}
        assert emitter.dropped == 0  # the engine side lost nothing either
        assert daemon.receiver is not None and daemon.receiver._thread.is_alive()
        assert snap.samplers["simulated"].success
        daemon.tick(time.time_ns() + 10**9)
        assert "GPU-sim-0" in daemon.state.snapshot().attribution
        metrics = scrape(daemon.state)
        assert value(metrics, "phaselens_agent_recorder_failed") == 1
        daemon.state.mark_started()
        code, body = health(daemon.state)
        assert code == 200 and "No space left" in body["recorder_error"]
    finally:
        emitter.close()
        daemon.close()  # closing the failed recorder again raises nothing


def test_recorder_metric_is_zero_while_recording_works(tmp_path: Path) -> None:
    daemon = build_daemon(AgentConfig(source="simulated", socket_path=str(tmp_path / "s.sock"),
                                      hostname="node-d"), with_receiver=False)
    daemon.record_to(TraceWriter(tmp_path / "t.jsonl"))
    daemon.tick()
    assert value(scrape(daemon.state), "phaselens_agent_recorder_failed") == 0
    daemon.close()


def test_record_command_on_a_full_disk_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    from click.testing import CliRunner

    from phaselens.cli import cli

    result = CliRunner().invoke(cli, ["record", "/dev/full", "--source", "simulated", "--duration-s", "1",
                                      "--poll-interval-ms", "1", "--socket-path", str(tmp_path / "s.sock")])
    assert result.exit_code == 1, result.output
    assert "recording to /dev/full stopped" in result.output and "No space left" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
