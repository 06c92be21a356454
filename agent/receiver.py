"""Phase receiver: the Unix datagram server the engines' shims send step records to.

The socket is created with 0660 permissions (the engine's group may send; nobody else). Each datagram is one
JSON record (phaselens.trace); it is validated for size, schema (``parse_line``), GPU (a UUID this agent
watches), time range (not far in the past or future, not absurdly long) and rate (a token bucket), and
every rejection is counted by reason in :class:`AgentState` and logged at most once a minute per reason.
Nothing a sender does can crash the receiver or grow its memory: the timeline is bounded.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable

from phaselens.agent.state import AgentState
from phaselens.agent.timeline import Timeline
from phaselens.trace import MetaRecord, StepRecord, TraceFormatError, parse_line

log = logging.getLogger(__name__)

#: Rejection reasons (the ``reason`` label of phaselens_shim_events_rejected_total).
REASONS = ("oversize", "malformed", "unknown_gpu", "time_range", "rate_limited", "not_a_step")


class PhaseReceiver:
    """Receives step records on ``socket_path`` and puts the valid ones on ``timeline``.

    ``known_gpus``: UUIDs this agent watches; ``None`` accepts any (it learns them from records).
    ``on_step``/``on_meta`` are called for each accepted record (the recorder uses them).
    """

    def __init__(self, socket_path: str | os.PathLike[str], state: AgentState, timeline: Timeline, *,
                 known_gpus: set[str] | None = None, max_record_bytes: int = 4096,
                 max_rate_per_s: float = 20_000.0, max_age_s: float = 600.0, max_future_s: float = 10.0,
                 max_step_s: float = 600.0, clock: Callable[[], int] = time.time_ns,
                 on_step: Callable[[StepRecord], None] | None = None,
                 on_meta: Callable[[MetaRecord], None] | None = None):
        self.socket_path = Path(socket_path)
        self.state, self.timeline = state, timeline
        self.known_gpus = known_gpus
        self.max_record_bytes = max_record_bytes
        self.max_rate_per_s = max_rate_per_s
        self.max_age_ns, self.max_future_ns = int(max_age_s * 1e9), int(max_future_s * 1e9)
        self.max_step_ns = int(max_step_s * 1e9)
        self.clock = clock
        self.on_step, self.on_meta = on_step, on_meta
        self._tokens = max_rate_per_s
        self._refill_ns = clock()
        self._last_log: dict[str, float] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.metas: dict[str, MetaRecord] = {}

    # ---------------------------------------------------------------- socket

    def start(self) -> None:
        """Bind the socket (0660, parent folder created) and start the receiving thread."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                raise ValueError(f"{self.socket_path} exists and is not a socket; refusing to replace it")
            self.socket_path.unlink()  # a stale socket from an earlier agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o117)  # the socket file is created 0660 from the start, no window with wider rights
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o660)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        # blocking: one wake-up per burst of datagrams (drained without waiting), none while idle; stop()
        # wakes it with an empty datagram
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="phase-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        bound = self._sock is not None
        self._stop.set()
        if self._thread is not None and self._sock is not None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as waker:
                    waker.sendto(b"", str(self.socket_path))
            except OSError as exc:  # the queue is full: the thread is awake anyway and sees the flag
                log.debug("phase receiver: wake-up datagram not sent: %s", exc)
            self._thread.join(timeout=2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if bound:  # only the socket this receiver made: never a file it refused to replace
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass

    def _run(self) -> None:
        assert self._sock is not None
        size = self.max_record_bytes + 1
        sock = self._sock
        while not self._stop.is_set():
            try:
                data = sock.recv(size)
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("phase receiver: recv failed: %s", exc)
                time.sleep(0.01)  # a persistent socket error must not spin
                continue
            while True:
                if self._stop.is_set():
                    return
                self.handle(data)
                try:
                    data = sock.recv(size, socket.MSG_DONTWAIT)  # drain what else is queued, no wake-up
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("phase receiver: recv failed: %s", exc)
                    break

    # ---------------------------------------------------------------- validation

    def handle(self, data: bytes) -> bool:
        """Validate one datagram; returns True if it was accepted. Never raises for bad input."""
        if len(data) > self.max_record_bytes:
            return self._reject("oversize", f"{len(data)} bytes > {self.max_record_bytes}")
        if not self._take_token():
            return self._reject("rate_limited", f"over {self.max_rate_per_s:.0f} records/s")
        try:
            rec = parse_line(data)
        except TraceFormatError as exc:
            return self._reject("malformed", str(exc))
        if isinstance(rec, MetaRecord):
            for g in rec.gpus:
                if self.known_gpus is None or g.uuid in self.known_gpus:
                    self.metas[g.uuid] = rec
            if self.on_meta:
                self.on_meta(rec)
            self.state.count_received()
            return True
        if not isinstance(rec, StepRecord):
            return self._reject("not_a_step", "only step and meta records are accepted on the socket")
        if self.known_gpus is not None and rec.gpu_uuid not in self.known_gpus:
            return self._reject("unknown_gpu", f"GPU {rec.gpu_uuid!r} is not watched by this agent")
        now = self.clock()
        if rec.t1_ns < now - self.max_age_ns or rec.t0_ns > now + self.max_future_ns \
                or rec.t1_ns - rec.t0_ns > self.max_step_ns:
            return self._reject("time_range", f"step {rec.t0_ns}..{rec.t1_ns} ns is out of range at {now}")
        self.timeline.add_step(rec)
        self.state.observe_step(rec)
        self.state.count_received()
        if self.on_step:
            self.on_step(rec)
        return True

    def _take_token(self) -> bool:
        now = self.clock()
        refill = (now - self._refill_ns) / 1e9 * self.max_rate_per_s
        self._tokens = min(self.max_rate_per_s, self._tokens + refill)
        self._refill_ns = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _reject(self, reason: str, detail: str) -> bool:
        self.state.count_rejected(reason)
        now = time.monotonic()
        if now - self._last_log.get(reason, -1e9) >= 60.0:
            self._last_log[reason] = now
            log.warning("phase receiver: rejected a record (%s): %s", reason, detail[:200])
        return False
