"""PhaseEmitter: datagrams to a bound socket, drops without a listener or with a full buffer, rate-limited
logging, JSONL output."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.emitter import PhaseEmitter
from phaselens.trace import GpuInfo, MetaRecord, StepRecord, read_trace

from .conftest import Listener


def _step(i: int, phase: Phase = Phase.DECODE) -> StepRecord:
    return StepRecord(gpu_uuid="GPU-sim-0", engine_id="e0", role=Role.COLOCATED, phase=phase, step=i,
                      t0_ns=1000 * i, t1_ns=1000 * i + 500, clock=Clock.HOST, prefill_tokens=0,
                      decode_tokens=3, batch=3, context_tokens=30 + i, flops=1.5e6, bytes=4.5e5)


def test_records_arrive_as_datagrams(listener: Listener) -> None:
    em = PhaseEmitter(listener.path)
    sent = [_step(i) for i in range(5)]
    for rec in sent:
        assert em.emit(rec)
    assert listener.wait_for(5) == sent
    assert (em.sent, em.dropped) == (5, 0)
    em.close()


def test_agent_started_later_is_picked_up_after_the_reconnect_interval(sock_dir: Path) -> None:
    path = sock_dir / "late.sock"
    now = [10.0]
    em = PhaseEmitter(path, reconnect_interval_s=1.0, monotonic=lambda: now[0])
    assert not em.emit(_step(0))
    late = Listener(path)
    try:
        now[0] += 0.5
        assert not em.emit(_step(1))  # within the interval: dropped without trying
        now[0] += 0.6
        assert em.emit(_step(2))
        assert em.emit(_step(3))
        assert [r.step for r in late.wait_for(2)] == [2, 3]
        assert (em.sent, em.dropped) == (2, 2)
    finally:
        late.close()
        em.close()


def test_missing_agent_costs_no_send_per_record(sock_dir: Path, monkeypatch) -> None:
    em = PhaseEmitter(sock_dir / "nobody.sock")
    calls = []

    def counting_dumps(rec: object) -> str:
        calls.append(rec)
        return "{}"

    monkeypatch.setattr("phaselens.serving_shim.emitter.dumps", counting_dumps)
    for i in range(100):
        em.emit(_step(i))
    assert len(calls) == 1 and em.dropped == 100  # one attempt, then dropped unsent for a second
    em.close()


def test_no_socket_file_drops_and_counts(sock_dir: Path) -> None:
    em = PhaseEmitter(sock_dir / "nobody.sock")
    for i in range(50):
        assert em.emit(_step(i)) is False
    assert (em.sent, em.dropped) == (0, 50)
    em.close()


def test_socket_file_with_nobody_bound_drops(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    assert path.exists()
    em = PhaseEmitter(path)
    assert em.emit(_step(0)) is False
    assert em.dropped == 1
    em.close()


def test_stalled_agent_parks_then_drops_instead_of_blocking(sock_dir: Path) -> None:
    # An agent that is bound but does not read: the kernel queue fills (EAGAIN at once), the backlog fills,
    # then the oldest parked records are dropped. Nothing waits.
    stalled = Listener(sock_dir / "stalled.sock", reading=False)
    try:
        em = PhaseEmitter(stalled.path, backlog=50)
        n = 300
        for i in range(n):
            em.emit(_step(i))
        assert em.sent > 0 and em.backlog == 50
        assert em.sent + em.backlog + em.dropped == n
        queued = em.sent
        stalled.start()  # the agent catches up; retries send the parked (newest) records in order
        got = stalled.wait_for(queued)
        deadline = time.monotonic() + 10
        while em.retry() and time.monotonic() < deadline:
            time.sleep(0.002)
        got = stalled.wait_for(queued + 50)
        assert [r.step for r in got] == list(range(queued)) + list(range(n - 50, n))
        assert em.sent == queued + 50
        em.close()
        assert not stalled.errors
    finally:
        stalled.close()


def test_backlog_keeps_order_and_close_counts_leftovers(sock_dir: Path) -> None:
    stalled = Listener(sock_dir / "stalled.sock", reading=False)
    try:
        em = PhaseEmitter(stalled.path, backlog=1000)
        for i in range(30):
            em.emit(_step(i))
        assert em.dropped == 0 and em.sent + em.backlog == 30
        em.close()
        assert em.dropped == 30 - em.sent
    finally:
        stalled.close()


def test_drop_warnings_are_rate_limited(sock_dir: Path, caplog) -> None:
    now = [100.0]
    em = PhaseEmitter(sock_dir / "nobody.sock", monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="phaselens.serving_shim.emitter")
    for i in range(500):
        em.emit(_step(i))
        now[0] += 0.01  # 500 drops over 5 s: one line
    assert len(caplog.records) == 1
    assert "nobody.sock" in caplog.records[0].getMessage()
    now[0] += 60.0
    em.emit(_step(500))
    assert len(caplog.records) == 2
    assert "dropped 500 record(s) (501 in all)" in caplog.records[1].getMessage()
    for i in range(1000):  # 1000 more drops in 59 s: no new line
        em.emit(_step(i))
        now[0] += 0.059
    assert len(caplog.records) == 2
    assert em.dropped == 1501
    em.close()


def test_jsonl_file_holds_meta_and_the_same_records(listener: Listener, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "steps.jsonl"
    em = PhaseEmitter(listener.path, out)
    meta = MetaRecord(host="h", gpus=(GpuInfo("GPU-sim-0", 0, "simulated (cpu)"),))
    em.write_meta(meta)
    recs = [_step(i, Phase.PREFILL if i % 2 else Phase.DECODE) for i in range(7)]
    for rec in recs:
        em.emit(rec)
    em.close()
    trace = read_trace(out)
    assert trace.meta == meta
    assert trace.steps == recs
    assert trace.malformed == 0
    assert listener.wait_for(7) == recs
    assert em.written == 8  # meta + 7 steps


def test_jsonl_without_socket(tmp_path: Path) -> None:
    em = PhaseEmitter(None, tmp_path / "only.jsonl")
    assert em.emit(_step(0))
    em.close()
    assert read_trace(tmp_path / "only.jsonl").steps == [_step(0)]
    assert (em.sent, em.dropped, em.written) == (0, 0, 1)


def test_emit_after_close_is_counted_not_raised(tmp_path: Path) -> None:
    em = PhaseEmitter(None, tmp_path / "x.jsonl")
    em.close()
    em.emit(_step(0))  # the writer is gone: nothing written, nothing raised
    assert em.written == 0
