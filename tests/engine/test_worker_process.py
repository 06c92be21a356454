"""WorkerProcess: a real spawned process running an engine loop (the fake engine, and the real one)."""

from __future__ import annotations

import os
import queue
import signal

import pytest

from phaselens.engine import protocol
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.worker_process import WorkerProcess
from tests.engine.server_harness import fake_workers, tiny_workers, wait_for


class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.exits: list[int | None] = []

    def on_event(self, worker, event) -> None:
        self.events.put(event)

    def on_exit(self, worker, code) -> None:
        self.exits.append(code)

    def outputs(self, request_id: str, timeout_s: float = 20.0) -> list[protocol.TokenDelta]:
        """Deltas of one request until it finishes."""
        got = []
        while True:
            ev = self.events.get(timeout=timeout_s)
            if isinstance(ev, protocol.StepReport):
                got += [d for d in ev.outputs if d.request_id == request_id]
                if got and got[-1].finished:
                    return got


def test_fake_worker_serves_aborts_and_reports() -> None:
    rec = Recorder()
    w = WorkerProcess(fake_workers(1)[0], rec.on_event, rec.on_exit)
    w.start()
    try:
        ready = w.wait_ready(30)
        assert ready.worker_id == "w0" and ready.pid == w.pid and ready.max_model_len == 256
        w.send(protocol.AddRequest("r1", [256, 72, 105], SamplingParams(max_tokens=3), arrival_ns=1))
        deltas = rec.outputs("r1")
        assert [d.new_token_ids for d in deltas] == [[97], [98], [99]]
        assert deltas[-1].finish_reason == "length" and deltas[-1].text == "abc"
        assert deltas[-1].num_prompt_tokens == 3
        # a too-long prompt is refused by the engine with its own message
        w.send(protocol.AddRequest("r2", [1] * 300, SamplingParams(max_tokens=1), arrival_ns=1))
        ev = wait_for(lambda: next((e for e in iter_events(rec)
                                    if isinstance(e, protocol.RequestRejected)), None),
                      what="RequestRejected")
        assert ev.request_id == "r2" and "context" in ev.message
    finally:
        w.stop()
    assert not w.alive and rec.exits == [0]


def iter_events(rec: Recorder):
    while True:
        try:
            yield rec.events.get(timeout=0.2)
        except queue.Empty:
            return


def test_failing_engine_start_is_reported_with_its_reason() -> None:
    rec = Recorder()
    w = WorkerProcess(fake_workers(1, fail_start=True)[0], rec.on_event, rec.on_exit)
    w.start()
    with pytest.raises(RuntimeError, match="fake engine told to fail"):
        w.wait_ready(30)
    w.stop()


def test_killed_worker_is_detected() -> None:
    rec = Recorder()
    w = WorkerProcess(fake_workers(1, step_s=0.05)[0], rec.on_event, rec.on_exit)
    w.start()
    w.wait_ready(30)
    os.kill(w.pid, signal.SIGKILL)
    wait_for(lambda: rec.exits, what="the exit callback")
    assert rec.exits == [-signal.SIGKILL] and not w.alive
    w.stop()


def test_real_engine_worker_generates_and_frees_kv_on_abort() -> None:
    rec = Recorder()
    w = WorkerProcess(tiny_workers(1)[0], rec.on_event, rec.on_exit)
    w.start()
    try:
        ready = w.wait_ready(120)
        assert ready.model_name == "tiny" and ready.vocab_size == 258
        w.send(protocol.AddRequest("a", list(range(1, 40)), SamplingParams(max_tokens=4, ignore_eos=True), 1))
        deltas = rec.outputs("a", timeout_s=60)
        assert sum(len(d.new_token_ids) for d in deltas) == 4 and deltas[-1].finish_reason == "length"
        # a long request, aborted after its first tokens: the engine's KV usage goes back to zero
        long = SamplingParams(max_tokens=1500, ignore_eos=True)
        w.send(protocol.AddRequest("b", list(range(1, 200)), long, 1))
        first = wait_for(lambda: next((e for e in iter_events(rec) if isinstance(e, protocol.StepReport)
                                       and e.outputs and e.stats["kv_usage"] > 0), None),
                         what="request b running")
        assert first.phase in ("prefill", "decode", "mixed") and first.step_seconds > 0
        w.send(protocol.AbortRequest("b"))
        wait_for(lambda: next((e for e in iter_events(rec) if isinstance(e, protocol.StatsReport)
                               and e.stats["num_running"] == 0 and e.stats["kv_usage"] == 0.0), None),
                 timeout_s=30, what="KV blocks freed after abort")
    finally:
        w.stop()
