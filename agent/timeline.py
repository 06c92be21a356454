"""Per-GPU timelines of steps and samples, bounded by a time horizon whatever the event rate.

Records older than ``horizon_s`` (plus a margin for the attribution's offset search) are dropped as new
ones arrive, and each GPU keeps at most ``max_steps`` steps and ``max_samples`` samples, so a flood cannot
grow memory beyond a fixed bound (the oldest go first). Thread-safe: the receiver thread adds steps while the
daemon loop adds samples and reads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterable

from phaselens.trace import SampleRecord, StepRecord

#: Extra history kept beyond the horizon: the offset search looks up to a few hundred ms back.
MARGIN_S = 5.0


class Timeline:
    """Steps and samples of every GPU over the last ``horizon_s`` seconds."""

    def __init__(self, horizon_s: float = 60.0, max_steps: int = 100_000, max_samples: int = 50_000,
                 clock: Callable[[], int] = time.time_ns):
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.horizon_ns = int((horizon_s + MARGIN_S) * 1e9)
        self.max_steps, self.max_samples = max_steps, max_samples
        self.clock = clock
        self._lock = threading.Lock()
        self._steps: dict[str, deque[StepRecord]] = {}
        self._samples: dict[str, deque[SampleRecord]] = {}
        self._newest: dict[str, int] = {}
        #: per GPU: the latest end of any step added, and how far (ns) the latest-arriving step ended before
        #: that: bounds how far back :meth:`steps_between` must walk
        self._step_end: dict[str, int] = {}
        self._lateness: dict[str, int] = {}
        self.dropped_steps = 0
        self.dropped_samples = 0

    def add_step(self, step: StepRecord) -> None:
        with self._lock:
            q = self._steps.get(step.gpu_uuid)
            if q is None:
                q = self._steps[step.gpu_uuid] = deque()
            # appended in arrival order (O(1) whatever a sender does); readers sort. Late or out-of-order
            # steps (two engines on one GPU) are therefore fine; the count cap bounds what a flood holds.
            q.append(step)
            self._note(step.gpu_uuid, step.t1_ns)
            end = self._step_end.get(step.gpu_uuid, step.t1_ns)
            if step.t1_ns < end:
                self._lateness[step.gpu_uuid] = max(self._lateness.get(step.gpu_uuid, 0), end - step.t1_ns)
            else:
                self._step_end[step.gpu_uuid] = step.t1_ns
            while len(q) > self.max_steps:
                q.popleft()
                self.dropped_steps += 1
            self._trim_locked(step.gpu_uuid)

    def add_samples(self, samples: Iterable[SampleRecord]) -> None:
        with self._lock:
            touched = set()
            for s in samples:
                q = self._samples.get(s.gpu_uuid)
                if q is None:
                    q = self._samples[s.gpu_uuid] = deque()
                q.append(s)
                self._note(s.gpu_uuid, s.t_ns)
                while len(q) > self.max_samples:
                    q.popleft()
                    self.dropped_samples += 1
                touched.add(s.gpu_uuid)
            for uuid in touched:
                self._trim_locked(uuid)

    def _note(self, uuid: str, t: int) -> None:
        if t > self._newest.get(uuid, 0):
            self._newest[uuid] = t

    def _trim_locked(self, uuid: str) -> None:
        # the newest record, but never ahead of the clock: one record stamped in the future must not push
        # the whole horizon out
        cutoff = min(self._newest.get(uuid, 0), self.clock()) - self.horizon_ns
        steps = self._steps.get(uuid)
        while steps and steps[0].t1_ns < cutoff:  # the oldest arrivals; a straggler goes with the count cap
            steps.popleft()
        samples = self._samples.get(uuid)
        while samples and samples[0].t_ns < cutoff:
            samples.popleft()

    def gpu_count(self) -> int:
        """How many GPUs have steps here (cheap: no copy, no sort)."""
        return len(self._steps)

    def gpus(self) -> list[str]:
        with self._lock:
            return sorted(set(self._steps) | set(self._samples))

    def steps(self, uuid: str) -> list[StepRecord]:
        """Steps of ``uuid`` in start order."""
        with self._lock:
            items = list(self._steps.get(uuid, ()))
        items.sort(key=lambda s: s.t0_ns)
        return items

    def samples(self, uuid: str) -> list[SampleRecord]:
        with self._lock:
            return list(self._samples.get(uuid, ()))

    def steps_between(self, gpu_uuid: str, t0_ns: int, t1_ns: int) -> list[StepRecord]:
        """Steps of ``gpu_uuid`` overlapping [t0_ns, t1_ns] (the simulated sampler's view)."""
        with self._lock:
            q = self._steps.get(gpu_uuid)
            if not q:
                return []
            # Recent windows: walk from the newest arrival back. Once a step ends more than the largest
            # lateness seen before t0, every step that arrived before it ended before t0 (it ended no later
            # than the latest end at that arrival, which is at most that lateness after this step's end), so
            # none of them can overlap. Capped by the horizon, the bound this walk has always had.
            limit = t0_ns - min(self._lateness.get(gpu_uuid, 0), self.horizon_ns)
            out = []
            for s in reversed(q):
                if s.t1_ns < limit:
                    break
                if s.t0_ns <= t1_ns and s.t1_ns >= t0_ns:
                    out.append(s)
            out.reverse()
            return out

    def size(self) -> tuple[int, int]:
        """(steps, samples) held over all GPUs."""
        with self._lock:
            return sum(len(q) for q in self._steps.values()), sum(len(q) for q in self._samples.values())
