"""StepTimer's CUDA path against a simulated GPU: intervals resolve through query() only, map to the host
clock through the reference event, and re-anchoring keeps a drifting GPU clock within bounds.

The fake replaces torch.cuda's Event, current_stream, device and current_device: a stream is a queue whose
work finishes at simulated times, an event completes when the simulated GPU reaches it, and the GPU's own
timer runs ``drift`` fast against the host clock. The real thing is covered by test_gpu_shim.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from phaselens.phase import Clock
from phaselens.serving_shim.timer import StepTimer

LAUNCH_NS = 4_000  # host submit to GPU start of an idle stream


class FakeGpu:
    def __init__(self, drift: float = 0.0):
        self.now = 1_700_000_000_000_000_000  # host wall clock, ns
        self.busy_until = self.now  # when the queued work ends
        self.drift = drift
        self.syncs = 0

    def timer_ms(self, host_ns: int) -> float:
        """The GPU's own timer (ms) at host time host_ns; runs (1 + drift) times as fast."""
        return (host_ns - 1_700_000_000_000_000_000) * (1 + self.drift) / 1e6

    def work(self, ns: int) -> None:
        self.busy_until = max(self.busy_until, self.now + LAUNCH_NS) + ns

    def clock_ns(self) -> int:
        self.now += 100  # reading the clock takes a little time
        return self.now


class FakeStream:
    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    def query(self) -> bool:
        return self.gpu.busy_until <= self.gpu.now

    def synchronize(self) -> None:
        self.gpu.syncs += 1
        self.gpu.now = max(self.gpu.now, self.gpu.busy_until)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu) -> None:
    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.at: int | None = None

        def record(self, stream: FakeStream | None = None) -> None:
            self.at = max(gpu.busy_until, gpu.now + LAUNCH_NS)
            gpu.busy_until = self.at

        def query(self) -> bool:
            return self.at is not None and self.at <= gpu.now

        def elapsed_time(self, end: "FakeEvent") -> float:
            if not (self.query() and end.query()):
                raise RuntimeError("elapsed_time on an event that has not completed")
            assert self.at is not None and end.at is not None
            return gpu.timer_ms(end.at) - gpu.timer_ms(self.at)

        def synchronize(self) -> None:
            raise AssertionError("the timer must not synchronize an event")

    stream = FakeStream(gpu)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def test_intervals_resolve_with_query_and_map_to_host_time(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu()
    fake_cuda(monkeypatch, gpu)
    timer: StepTimer[int] = StepTimer("cuda", clock_ns=gpu.clock_ns)
    assert timer.clock is Clock.GPU and gpu.syncs == 1  # the start-up anchor only
    truth = []
    for i in range(3):
        timer.begin()
        start = max(gpu.busy_until, gpu.now + LAUNCH_NS)
        gpu.work(5_000_000)  # a 5 ms step
        timer.end(i)
        truth.append((start, gpu.busy_until))
        gpu.now += 200_000  # the host runs ahead: 0.2 ms per step
    assert timer.poll() == [] and timer.pending == 3  # nothing finished yet, and no waiting
    gpu.now = truth[1][1] + 1  # the GPU has finished two steps
    done = timer.poll()
    assert [p for p, _, _ in done] == [0, 1] and timer.pending == 1
    gpu.now = truth[2][1] + 1
    done += timer.poll()
    for (i, t0, t1), (s, e) in zip(done, truth):
        assert abs(t0 - s) < 10_000 and abs(t1 - e) < 10_000  # within the anchor's launch error (us)
        assert t1 - t0 == e - s
    assert [t1 <= t0n for (_, _, t1), (_, t0n, _) in zip(done, done[1:])] == [True, True]
    assert gpu.syncs == 1


def test_reanchoring_bounds_clock_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU timer runs 50 ppm fast: over 100 s a fixed anchor would be 5 ms off; re-anchoring every second
    # on an idle stream keeps the error at the launch latency plus 1 s of drift (50 us).
    gpu = FakeGpu(drift=50e-6)
    fake_cuda(monkeypatch, gpu)
    timer: StepTimer[int] = StepTimer("cuda", reanchor_interval_s=1.0, clock_ns=gpu.clock_ns)
    worst = 0
    for i in range(1000):  # 100 s of 10 ms steps separated by 90 ms idle gaps
        timer.begin()
        start = max(gpu.busy_until, gpu.now + LAUNCH_NS)
        gpu.work(10_000_000)
        timer.end(i)
        end = gpu.busy_until
        gpu.now = end + 90_000_000
        (p, t0, t1), = timer.poll()
        worst = max(worst, abs(t0 - start), abs(t1 - end))
    assert worst < 60_000
    assert gpu.syncs == 1


def test_ring_bound_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu()
    fake_cuda(monkeypatch, gpu)
    timer: StepTimer[int] = StepTimer("cuda", capacity=4, clock_ns=gpu.clock_ns)
    for i in range(10):
        timer.begin()
        gpu.work(1_000_000)
        timer.end(i)
    assert (timer.pending, timer.dropped) == (4, 6)
    gpu.now = gpu.busy_until
    assert [p for p, _, _ in timer.poll()] == [6, 7, 8, 9]
