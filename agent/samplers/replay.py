"""Replay sampler: feeds a recorded trace through the live path (timeline -> attribution -> publish).

Samples and steps keep their sources and their spacing; times are shifted so the trace's first record lands
at the replay's start (the agent's horizon is wall-clock). ``speed`` > 1 replays faster: step durations
shrink by it, and so do their FLOPs and bytes, so that MFU/MBU are those recorded. The steps come out of
:meth:`steps_due` for the daemon to put on the timeline, as if the shim had sent them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from phaselens.trace import SampleRecord, StepRecord, Trace, read_trace


class ReplaySampler:
    """Replays ``trace`` (a path or a :class:`Trace`) in real time times ``speed``."""

    name = "replay"

    def __init__(self, trace: str | os.PathLike[str] | Trace, speed: float = 1.0,
                 clock: Callable[[], int] = time.time_ns):
        if speed <= 0:
            raise ValueError(f"replay speed must be > 0, got {speed}")
        self.trace = trace if isinstance(trace, Trace) else read_trace(trace)
        self.speed, self.clock = speed, clock
        self._samples = sorted(self.trace.samples, key=lambda s: s.t_ns)
        self._steps = sorted(self.trace.steps, key=lambda s: s.t1_ns)
        firsts = [r.t_ns for r in self._samples[:1]] + [r.t0_ns for r in self._steps[:1]]
        self._t0 = min(firsts) if firsts else 0
        self._start: int | None = None
        self._i_sample = 0
        self._i_step = 0

    @property
    def finished(self) -> bool:
        return self._i_sample >= len(self._samples) and self._i_step >= len(self._steps)

    def _due(self) -> tuple[int, int]:
        now = self.clock()
        if self._start is None:
            self._start = now
        trace_now = self._t0 + int((now - self._start) * self.speed)
        return trace_now, self._start - self._t0

    def _shift(self, t: int) -> int:
        assert self._start is not None
        return self._start + int((t - self._t0) / self.speed)

    def sample(self) -> list[SampleRecord]:
        trace_now, _ = self._due()
        out = []
        while self._i_sample < len(self._samples) and self._samples[self._i_sample].t_ns <= trace_now:
            s = self._samples[self._i_sample]
            out.append(dataclasses.replace(s, t_ns=self._shift(s.t_ns)))
            self._i_sample += 1
        return out

    def steps_due(self) -> list[StepRecord]:
        """Steps whose end has been reached, shifted like the samples."""
        trace_now, _ = self._due()
        out = []
        while self._i_step < len(self._steps) and self._steps[self._i_step].t1_ns <= trace_now:
            s = self._steps[self._i_step]
            # a step shortened by the speed did its work in less time: FLOPs and bytes shrink with it, so
            # that per-phase MFU/MBU (work over duration over peak) read as recorded at any speed
            out.append(dataclasses.replace(s, t0_ns=self._shift(s.t0_ns), t1_ns=self._shift(s.t1_ns),
                                           flops=s.flops / self.speed, bytes=s.bytes / self.speed))
            self._i_step += 1
        return out
