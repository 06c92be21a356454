"""Step intervals: CUDA events resolved lazily with ``query()`` on GPU, the host clock on CPU.

DESIGN.md ("Phases and clocks"): a step's interval is its GPU execution interval, read later with
``event.query()`` (never a synchronize on the hot path) and mapped to wall-clock nanoseconds
(``time.time_ns()``) so that the engine and the agent share one clock.

The mapping goes through a *reference event*: an event recorded on the stream while it is idle, so that the
GPU reaches it within the launch latency (microseconds) of the host reading ``time.time_ns()`` beside it.
An event ``e`` then happened at ``anchor_host_ns + anchor.elapsed_time(e)``. The anchor is set once at start
(one synchronize there is fine: nothing runs yet) and re-set whenever :meth:`StepTimer.poll` finds the
stream idle and the anchor older than ``reanchor_interval_s``. Re-anchoring is needed because the mapping
drifts: the GPU timer and the host's ``CLOCK_REALTIME`` run from different oscillators (a few ppm apart,
tens of microseconds a minute), NTP slews and steps the wall clock, and ``elapsed_time`` is a float32 of
milliseconds whose resolution decays with the anchor's age (61 ns at 1 s, 0.25 ms at an hour). Re-anchoring
only on an idle stream keeps the "GPU reaches it at once" assumption true and needs no synchronize.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch

from phaselens.phase import Clock

T = TypeVar("T")

#: Default bound on steps recorded but not yet resolved (about a minute of 15 ms steps).
DEFAULT_CAPACITY = 4096


@dataclass
class _Anchor:
    event: Any  # torch.cuda.Event, recorded on an idle stream
    host_ns: int  # time.time_ns() when the GPU reached it (within the launch latency)


@dataclass(slots=True)
class _Pending(Generic[T]):
    payload: T
    anchor: _Anchor | None
    start: Any  # torch.cuda.Event | int (host ns)
    end: Any


class StepTimer(Generic[T]):
    """Times steps without blocking; :meth:`poll` returns the intervals that have finished, in order.

    ``begin()`` before a step, ``end(payload)`` after it; ``poll()`` yields ``(payload, t0_ns, t1_ns)`` for
    every finished step. At most ``capacity`` steps wait unresolved: when the ring is full the oldest is
    dropped and counted in :attr:`dropped`, never waited for.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = DEFAULT_CAPACITY,
                 reanchor_interval_s: float = 1.0, clock_ns: Callable[[], int] = time.time_ns):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.device = torch.device(device)
        self.clock = Clock.GPU if self.device.type == "cuda" else Clock.HOST
        self.capacity = capacity
        self.dropped = 0
        self._clock_ns = clock_ns
        self._reanchor_ns = int(reanchor_interval_s * 1e9)
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._start: Any = None
        self._start_anchor: _Anchor | None = None
        self._stream: Any = None  # the stream the step began on: its end is recorded there too
        self._free_events: list[Any] = []  # resolved events, reused: creation is a driver call
        self._anchor: _Anchor | None = None
        if self.clock is Clock.GPU:
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            with torch.cuda.device(self.device):
                torch.cuda.current_stream(self.device).synchronize()  # start-up only: the stream is now idle
            self._anchor = self._record_anchor()

    # ------------------------------------------------------------------ hot path

    @property
    def pending(self) -> int:
        """Steps recorded and not yet resolved."""
        return len(self._pending)

    def begin(self) -> None:
        """Mark the start of a step (an event on the current stream, or the host clock)."""
        if self.clock is Clock.GPU:
            ev = self._event()
            self._stream = torch.cuda.current_stream(self.device)
            ev.record(self._stream)
            self._start = ev
            self._start_anchor = self._anchor  # recorded before ev, so elapsed times are positive
        else:
            self._start = self._clock_ns()

    def end(self, payload: T) -> None:
        """Mark the end of the step begun last (an event on the stream it began on); ``payload`` comes back
        from :meth:`poll` with its interval."""
        if self._start is None:
            raise RuntimeError("StepTimer.end() without a matching begin()")
        if self.clock is Clock.GPU:
            end: Any = self._event()
            end.record(self._stream)  # one current_stream() lookup a step, not two (a few us of Python each)
        else:
            end = self._clock_ns()
        if len(self._pending) >= self.capacity:
            old = self._pending.popleft()
            self.dropped += 1
            self._release(old)
        self._pending.append(_Pending(payload, self._start_anchor, self._start, end))
        self._start = None

    def poll(self) -> list[tuple[T, int, int]]:
        """The finished steps as ``(payload, t0_ns, t1_ns)``, oldest first. Never synchronizes.

        Steps on one stream finish in order, so this stops at the first unfinished one.
        """
        done: list[tuple[T, int, int]] = []
        pending = self._pending
        if self.clock is Clock.HOST:
            while pending:
                p = pending.popleft()
                done.append((p.payload, p.start, p.end))
            return done
        while pending and pending[0].end.query():
            p = pending.popleft()
            anchor = p.anchor
            assert anchor is not None
            t0 = anchor.host_ns + round(anchor.event.elapsed_time(p.start) * 1e6)
            t1 = anchor.host_ns + round(anchor.event.elapsed_time(p.end) * 1e6)
            done.append((p.payload, t0, max(t0, t1)))
            self._release(p)
        self._maybe_reanchor()
        return done

    def discard_pending(self) -> int:
        """Drop every unresolved step (counted in :attr:`dropped`); returns how many."""
        n = len(self._pending)
        while self._pending:
            self._release(self._pending.popleft())
        self.dropped += n
        return n

    # ------------------------------------------------------------------ internals

    def _event(self) -> Any:
        if self._free_events:
            return self._free_events.pop()
        return torch.cuda.Event(enable_timing=True)

    def _release(self, p: _Pending[T]) -> None:
        if self.clock is Clock.GPU and len(self._free_events) < 64:
            self._free_events.extend((p.start, p.end))

    def _record_anchor(self) -> _Anchor:
        # The stream is idle, so the GPU reaches the event as soon as it is submitted: take the host clock on
        # both sides of the submission and use the midpoint (error: the launch latency, microseconds).
        ev = torch.cuda.Event(enable_timing=True)
        before = self._clock_ns()
        ev.record(torch.cuda.current_stream(self.device))
        after = self._clock_ns()
        return _Anchor(ev, (before + after) // 2)

    def _maybe_reanchor(self) -> None:
        anchor = self._anchor
        if anchor is None or self._clock_ns() - anchor.host_ns < self._reanchor_ns:
            return
        if torch.cuda.current_stream(self.device).query():  # idle: no work queued ahead of the new anchor
            self._anchor = self._record_anchor()
