"""Least-loaded routing of requests to engine workers.

Load is what the front-end itself has handed a worker and not yet seen finish: requests in flight, then
their prompt plus remaining output tokens as the tie-break. That is exact and current (the workers' own
stats arrive a step late). Only live, routable workers of the asked-for role are candidates, so split-pool
mode (issue 6) picks a prefill worker with ``select(..., role=Role.PREFILL)`` and a decode worker with
``Role.DECODE`` from the same table. A decode worker is picked KV-space aware: given ``need_blocks``,
workers whose last reported free KV blocks (minus what was sent to them since) cannot hold the request are
passed over while another can. A mode change re-labels workers (:meth:`Router.set_roles`); a worker left out
of the new mode stays in the table, unroutable, until it is given a role again.
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
    routable: bool = True
    #: KV blocks free at the worker's last report (None: not reported), less blocks sent to it since
    kv_free_blocks: int | None = None


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

    def revive(self, worker_id: str) -> None:
        """A restarted worker is back in rotation, with the role it had."""
        with self._lock:
            load = self._workers[worker_id]
            load.alive, load.requests, load.tokens = True, 0, 0

    def set_roles(self, roles: dict[str, Role | None]) -> None:
        """Re-label workers at once (a mode change): None makes a worker unroutable."""
        with self._lock:
            for wid, role in roles.items():
                load = self._workers[wid]
                load.routable = role is not None
                if role is not None:
                    load.role = role

    def report_kv(self, worker_id: str, free_blocks: int | None) -> None:
        """A worker's free KV blocks from its latest stats."""
        with self._lock:
            if worker_id in self._workers:
                self._workers[worker_id].kv_free_blocks = free_blocks

    def select(self, request_id: str, tokens: int, role: Role = Role.COLOCATED,
               need_blocks: int | None = None) -> str:
        """Assign ``request_id`` to the least-loaded live worker of ``role`` and charge it.

        ``need_blocks``: prefer workers with that many free KV blocks (a hand-off's destination).
        """
        with self._lock:
            candidates = [w for w in self._workers.values() if w.alive and w.routable and w.role == role]
            if not candidates:
                raise NoWorkerAvailable(f"no live {role.value} worker")
            if need_blocks is not None:
                roomy = [w for w in candidates if w.kv_free_blocks is None or w.kv_free_blocks >= need_blocks]
                candidates = roomy or candidates
            # ties go to the lowest worker id: deterministic, and tests can predict it
            best = min(candidates, key=lambda w: (w.requests, w.tokens, w.worker_id))
            best.requests += 1
            best.tokens += tokens
            if need_blocks is not None and best.kv_free_blocks is not None:
                best.kv_free_blocks = max(0, best.kv_free_blocks - need_blocks)
            self._assigned[request_id] = (best.worker_id, tokens)
            return best.worker_id

    def assign(self, request_id: str, worker_id: str, tokens: int) -> None:
        """Charge ``request_id`` to a given worker (a hand-off continued where its KV already is)."""
        with self._lock:
            load = self._workers[worker_id]
            load.requests += 1
            load.tokens += tokens
            self._assigned[request_id] = (worker_id, tokens)

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
            return sum(1 for w in self._workers.values()
                       if w.alive and (role is None or (w.routable and w.role == role)))
