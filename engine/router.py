"""Least-loaded routing of requests to engine workers.

Load is what the front-end itself has handed a worker and not yet seen finish: requests in flight, then
their prompt plus remaining output tokens as the tie-break. That is exact and current (the workers'
own stats arrive a step late). Only live workers of the asked-for role are candidates, so split-pool mode
(issue 6) picks a prefill worker with ``select(..., role=Role.PREFILL)`` and a decode worker with
``Role.DECODE`` from the same table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from phaselens.phase import Role


@dataclass
class WorkerLoad:
    """The router's view of one worker."""

    worker_id: str
    role: Role
    alive: bool = True
    requests: int = 0
    tokens: int = 0


class NoWorkerAvailable(RuntimeError):
    """No live worker of the requested role."""


class Router:
    """Picks the least-loaded live worker of a role and keeps the load table (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerLoad] = {}
        #: request_id -> (worker_id, tokens charged)
        self._assigned: dict[str, tuple[str, int]] = {}

    def add_worker(self, worker_id: str, role: Role = Role.COLOCATED) -> None:
        with self._lock:
            self._workers[worker_id] = WorkerLoad(worker_id, role)

    def mark_dead(self, worker_id: str) -> list[str]:
        """Take a worker out of rotation; returns the requests it was serving (now orphaned)."""
        with self._lock:
            self._workers[worker_id].alive = False
            orphans = [rid for rid, (wid, _) in self._assigned.items() if wid == worker_id]
            for rid in orphans:
                del self._assigned[rid]
            load = self._workers[worker_id]
            load.requests, load.tokens = 0, 0
            return orphans

    def select(self, request_id: str, tokens: int, role: Role = Role.COLOCATED) -> str:
        """Assign ``request_id`` to the least-loaded live worker of ``role`` and charge it."""
        with self._lock:
            candidates = [w for w in self._workers.values() if w.alive and w.role == role]
            if not candidates:
                raise NoWorkerAvailable(f"no live {role.value} worker")
            # ties go to the lowest worker id: deterministic, and tests can predict it
            best = min(candidates, key=lambda w: (w.requests, w.tokens, w.worker_id))
            best.requests += 1
            best.tokens += tokens
            self._assigned[request_id] = (best.worker_id, tokens)
            return best.worker_id

    def release(self, request_id: str) -> None:
        """The request finished (or failed, or was aborted): take its load off its worker."""
        with self._lock:
            entry = self._assigned.pop(request_id, None)
            if entry is None:
                return
            load = self._workers[entry[0]]
            load.requests -= 1
            load.tokens -= entry[1]

    def worker_of(self, request_id: str) -> str | None:
        with self._lock:
            entry = self._assigned.get(request_id)
            return None if entry is None else entry[0]

    def loads(self) -> list[WorkerLoad]:
        """A copy of the table, ordered by worker id."""
        with self._lock:
            return [WorkerLoad(**vars(w)) for _, w in sorted(self._workers.items())]

    def alive_count(self, role: Role | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._workers.values() if w.alive and (role is None or w.role == role))
