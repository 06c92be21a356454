"""Send step records to the node agent as Unix datagrams, without ever blocking the engine.

DESIGN.md ("Data flow"): the emitter runs inside the engine worker and "never blocks; counts drops". The
socket is non-blocking, so a missing agent (no socket file, or nobody bound to it), a full receive buffer
(a slow agent) or any other ``OSError`` costs one failed system call: the record is dropped and counted,
and at most one log line a minute says how many were lost. Losing records is the lesser harm: a blocked
engine would change the very phases being measured.

A full receive queue is the one case worth a short wait: Linux caps a Unix datagram socket's queue at
``net.unix.max_dgram_qlen`` datagrams (10 by default), whatever its ``SO_RCVBUF``, so an agent descheduled for
ten steps would already lose records. A full queue (``EAGAIN``) therefore parks the record in a bounded
backlog that later calls retry, oldest first, without waiting; when the backlog is full its oldest record is
dropped and counted. A missing agent is not waited for at all: after a send finds no agent (no socket file, or
nobody bound), records are counted as dropped without serializing or sending them until
``reconnect_interval_s`` has passed, so an engine with no agent pays one clock read per step; an agent that
starts later is picked up within that interval.

The same records can also go to a JSON Lines file (:class:`phaselens.trace.TraceWriter`), the trace format
``phaselens attribute`` reads.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import Callable, Protocol

from phaselens.trace import MetaRecord, Record, TraceWriter, dumps

log = logging.getLogger(__name__)

#: Where the node agent listens (DESIGN.md); the engine's ``shim_socket_path`` overrides it.
DEFAULT_SOCKET_PATH = "/run/phaselens/phaselens.sock"

#: At most one drop warning per this many seconds.
LOG_INTERVAL_S = 60.0

#: Records parked while the agent's queue is full (about 10 s of steps at 100 steps/s).
DEFAULT_BACKLOG = 1024

#: After finding no agent, drop records unsent for this long before trying the socket again.
RECONNECT_INTERVAL_S = 1.0


class LazyRecord(Protocol):
    """A record its producer serializes itself: ``json()`` equals ``dumps(record())``, and each is called only
    when needed: no line is formatted while the agent is known to be absent, no record object is built
    without a JSONL file."""

    def json(self) -> str: ...

    def record(self) -> Record: ...


class _Built:
    """A built record as a :class:`LazyRecord`."""

    __slots__ = ("rec",)

    def __init__(self, rec: Record) -> None:
        self.rec = rec

    def json(self) -> str:
        return dumps(self.rec)

    def record(self) -> Record:
        return self.rec


class PhaseEmitter:
    """One datagram per record to ``socket_path`` (None: no socket) and optionally one line to ``jsonl_path``.

    :attr:`sent` counts datagrams the kernel accepted, :attr:`dropped` records lost (socket or file error),
    :attr:`written` lines written to the JSONL file, :attr:`backlog` records parked while the agent's queue
    is full. ``monotonic`` is a seam for tests of the rate limit.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = DEFAULT_SOCKET_PATH,
                 jsonl_path: str | os.PathLike[str] | None = None, *,
                 log_interval_s: float = LOG_INTERVAL_S, backlog: int = DEFAULT_BACKLOG,
                 reconnect_interval_s: float = RECONNECT_INTERVAL_S,
                 monotonic: Callable[[], float] = time.monotonic):
        if backlog < 0:
            raise ValueError(f"backlog must be >= 0, got {backlog}")
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.jsonl_path = os.fspath(jsonl_path) if jsonl_path is not None else None
        self.sent = 0
        self.dropped = 0
        self.written = 0
        self._log_interval_s = log_interval_s
        self._monotonic = monotonic
        self._last_log: float | None = None
        self._dropped_since_log = 0
        self._sock: socket.socket | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_max = backlog
        self._reconnect_s = reconnect_interval_s
        self._absent_until = float("-inf")  # monotonic time until which the agent is taken as absent
        self._absent_reason = ""
        if self.socket_path is not None:
            # Unbound and unconnected: each sendto() names the path, so an agent that starts (or restarts)
            # later is picked up without reconnecting.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self._writer: TraceWriter | None = None
        if self.jsonl_path is not None:
            self._writer = TraceWriter(self.jsonl_path)

    def write_meta(self, meta: MetaRecord) -> None:
        """Write the trace header to the JSONL file (not sent: the agent knows its own GPUs)."""
        if self._writer is not None:
            self._write(meta)

    @property
    def backlog(self) -> int:
        """Records waiting for room in the agent's queue."""
        return len(self._backlog)

    def emit(self, rec: Record) -> bool:
        """Send (and write) one record; True if the datagram went out now. Never raises or waits."""
        return self.emit_lazy(_Built(rec))

    def emit_lazy(self, rec: LazyRecord) -> bool:
        """:meth:`emit` for a record serialized by its producer (the shim's step records)."""
        ok = True
        if self._sock is not None:
            if self._absent_until > self._monotonic():
                self._note_drop(self._absent_reason)
                ok = False
            else:
                ok = self._send(rec.json().encode())
        if self._writer is not None:
            self._write(rec.record())
        return ok

    def retry(self) -> int:
        """Try the parked records again, oldest first, until the queue is full; how many are still parked."""
        if self._sock is None or not self._backlog:
            return 0
        while self._backlog:
            data = self._backlog[0]
            try:
                self._sock.sendto(data, self.socket_path)  # type: ignore[arg-type]
            except BlockingIOError:
                break
            except OSError as exc:
                self._backlog.popleft()
                self._note_drop(self._failed(exc))
                continue
            self._backlog.popleft()
            self.sent += 1
        return len(self._backlog)

    def flush(self) -> None:
        """Flush the JSONL file."""
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as exc:
                self._note_drop(f"cannot flush {self.jsonl_path}: {exc}", count=0)

    def close(self) -> None:
        """Close the socket and the file; parked records are dropped and counted."""
        if self._backlog:
            n = len(self._backlog)
            self._backlog.clear()
            self._note_drop(f"{n} record(s) still waiting for the agent at close", count=n)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                self._note_drop(f"cannot close {self.jsonl_path}: {exc}", count=0)
            self._writer = None

    # ------------------------------------------------------------------ internals

    def _send(self, data: bytes) -> bool:
        assert self._sock is not None and self.socket_path is not None
        if self._backlog and self.retry():
            self._park(data)  # keep the order: older records go first
            return False
        try:
            self._sock.sendto(data, self.socket_path)
        except BlockingIOError:  # the agent's queue is full: it is alive, only late
            self._park(data)
            return False
        except OSError as exc:
            # FileNotFoundError / ConnectionRefusedError: no agent; anything else (EMSGSIZE, ...) is dropped
            # the same way rather than surfacing in the engine.
            self._note_drop(self._failed(exc))
            return False
        self.sent += 1
        return True

    def _park(self, data: bytes) -> None:
        if len(self._backlog) >= self._backlog_max:
            if not self._backlog:
                self._note_drop(f"agent socket {self.socket_path}: queue full")
                return
            self._backlog.popleft()
            self._note_drop(f"agent socket {self.socket_path}: queue and backlog full")
        self._backlog.append(data)

    def _failed(self, exc: OSError) -> str:
        """The drop reason for ``exc``; a missing agent also starts the reconnect interval."""
        reason = f"agent socket {self.socket_path}: {exc.__class__.__name__}: {exc.strerror or exc}"
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            self._absent_until = self._monotonic() + self._reconnect_s
            self._absent_reason = f"{reason} (trying again every {self._reconnect_s:g} s)"
        return reason

    def _write(self, rec: Record) -> None:
        assert self._writer is not None
        try:
            self._writer.write(rec)
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            self._note_drop(f"cannot write {self.jsonl_path}: {exc}")
            return
        self.written += 1

    def _note_drop(self, reason: str, count: int = 1) -> None:
        self.dropped += count
        self._dropped_since_log += count
        now = self._monotonic()
        if self._last_log is not None and now - self._last_log < self._log_interval_s:
            return
        log.warning("phase shim dropped %d record(s) (%d in all): %s", self._dropped_since_log, self.dropped,
                    reason)
        self._last_log = now
        self._dropped_since_log = 0
