"""Phase receiver: the Unix datagram server the engines' shims send step records to.

The socket is created with 0660 permissions (the engine's group may send; nobody else). Each datagram is one
JSON record (phaselens.trace); it is validated for size, schema (:func:`fast_step`, else ``parse_record``),
GPU (a UUID this agent watches), time range (not far in the past or future, not absurdly long) and rate (a
token bucket), and every rejection is counted by reason in :class:`AgentState` and logged at most once a
minute per reason. Nothing a sender does can crash the receiver or grow its memory: the timeline is bounded.

Records are received as they come and validated in batches. Right after a wake-up, with the interpreter's
caches cold and the core just out of idle, validating a record cost 55-70 us on our CPU machine against
10-12 us in a run of them, and receiving it (one recv) 16 us against 1 us (bench/agent_overhead.py, issue
12). So the thread (``_run``) lets a few records gather in the kernel's queue before it drains it, and keeps
what it drained until it has ``_HANDLE_BATCH`` records or ``handle_interval_s`` has passed, then validates
them all in one run: at ~60 steps/s per GPU, ~30 records twice a second. The daemon drains and validates
everything itself (:meth:`flush`) before it attributes and before each poll of a sampler that reads the
steps, so neither sees a step late; the /metrics counters lag by at most ``handle_interval_s``. The kernel
queues only ``net.unix.max_dgram_qlen`` datagrams (10 by default): the wait before a drain is sized to the
rate and the number of GPUs sending so that about six are queued, and a full queue parks records in the
shim's backlog, retried on its next step (serving_shim/emitter.py): delayed, not lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

from phaselens.agent.state import AgentState
from phaselens.agent.timeline import Timeline
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import MAX_COUNT, MAX_TIME_NS, MetaRecord, StepRecord, TraceFormatError, parse_record

log = logging.getLogger(__name__)

#: Rejection reasons (the ``reason`` label of phaselens_shim_events_rejected_total).
REASONS = ("oversize", "malformed", "unknown_gpu", "time_range", "rate_limited", "not_a_step")

#: the step record's enum fields as the shim writes them (lowercase values); any other spelling goes through
#: the full parser, which also accepts other cases of role and phase
_ROLES = {r.value: r for r in Role}
_PHASES = {p.value: p for p in Phase if p is not Phase.IDLE}  # a step is never idle (phaselens.trace)
_CLOCKS = {c.value: c for c in Clock}
_MAX_ID_LEN = 128  # phaselens.trace's bound on gpu_uuid and engine_id
#: records a batch aims to hold when the socket is drained: the burst that woke the receiver (one record per
#: GPU), those that gathered while it waited, and a burst arriving meanwhile stay under Linux's default
#: net.unix.max_dgram_qlen (10)
_BATCH_TARGET = 6.0
#: received records are validated once this many are waiting (or handle_interval_s after the first): a bound
#: on what waits in memory, whatever the rate
_HANDLE_BATCH = 256


def fast_step(obj: Any) -> StepRecord | None:
    """The step record a decoded datagram holds, if it is well-formed as the shim writes it; else ``None``,
    and the full parser (:func:`phaselens.trace.parse_record`) decides, with its error message.

    The receiver's hot path: every datagram is a step record, and the generic parser spends most of its time
    on per-field helper calls. This checks the same schema (DESIGN.md's step record: identifiers of 1..128
    characters, the lowercase role/phase/clock values (no idle step), integers in 0..MAX_COUNT (timestamps
    0..MAX_TIME_NS), finite non-negative floats, t1 not before t0) in one pass and builds the same
    :class:`StepRecord`; it never accepts what the parser rejects (tests/agent/test_receiver.py compares the
    two on valid and mutated records)."""
    try:
        if obj["type"] != "step":
            return None
        uuid, engine = obj["gpu_uuid"], obj["engine_id"]
        role, phase, clock = _ROLES.get(obj["role"]), _PHASES.get(obj["phase"]), _CLOCKS.get(obj["clock"])
        step, t0, t1 = obj["step"], obj["t0_ns"], obj["t1_ns"]
        prefill, decode, batch, context = (obj["prefill_tokens"], obj["decode_tokens"], obj["batch"],
                                           obj["context_tokens"])
        flops, nbytes = obj["flops"], obj["bytes"]
    except (KeyError, TypeError):  # not an object, a field missing, an unhashable enum value
        return None
    if (role is None or phase is None or clock is None
            or type(uuid) is not str or not 0 < len(uuid) <= _MAX_ID_LEN
            or type(engine) is not str or not 0 < len(engine) <= _MAX_ID_LEN
            # exact types: a JSON true is a bool, never a count
            or type(step) is not int or type(t0) is not int or type(t1) is not int
            or type(prefill) is not int or type(decode) is not int or type(batch) is not int
            or type(context) is not int
            or step < 0 or t0 < 0 or t1 < t0 or prefill < 0 or decode < 0 or batch < 0 or context < 0
            or t1 > MAX_TIME_NS or max(step, prefill, decode, batch, context) > MAX_COUNT
            # floats only (the shim's); an integer amount takes the full parser
            or type(flops) is not float or type(nbytes) is not float
            or not (math.isfinite(flops) and flops >= 0 and math.isfinite(nbytes) and nbytes >= 0)):
        return None
    return StepRecord(gpu_uuid=uuid, engine_id=engine, role=role, phase=phase, step=step, t0_ns=t0, t1_ns=t1,
                      clock=clock, prefill_tokens=prefill, decode_tokens=decode, batch=batch,
                      context_tokens=context, flops=flops, bytes=nbytes)


class PhaseReceiver:
    """Receives step records on ``socket_path`` and puts the valid ones on ``timeline``.

    ``known_gpus``: UUIDs this agent watches; ``None`` learns them from the records, up to ``max_gpus``
    UUIDs of the form ``GPU-...`` or ``MIG-...`` (DESIGN.md: GPUs are named by UUID), so that a sender
    cannot make the agent export a series set per made-up GPU.
    ``on_step``/``on_meta`` are called for each accepted record (the recorder uses them).
    ``batch_delay_s``: the longest records may gather in the kernel's queue before it is drained (module
    docstring); one GPU at 60 steps/s waits ~70 ms (six records a drain). ``handle_interval_s``: the longest
    a drained record waits to be validated.
    """

    def __init__(self, socket_path: str | os.PathLike[str], state: AgentState, timeline: Timeline, *,
                 known_gpus: set[str] | None = None, max_record_bytes: int = 4096,
                 max_rate_per_s: float = 20_000.0, max_age_s: float = 600.0, max_future_s: float = 10.0,
                 max_step_s: float = 600.0, max_gpus: int = 64, clock: Callable[[], int] = time.time_ns,
                 on_step: Callable[[StepRecord], None] | None = None,
                 on_meta: Callable[[MetaRecord], None] | None = None,
                 batch_delay_s: float = 0.1, handle_interval_s: float = 0.5):
        self.socket_path = Path(socket_path)
        self.state, self.timeline = state, timeline
        self.known_gpus = known_gpus
        self.max_gpus = max_gpus
        #: GPUs learned from records (when known_gpus is None)
        self.learned_gpus: set[str] = set()
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
        self.batch_delay_s = batch_delay_s
        self.handle_interval_s = handle_interval_s
        #: drained, not yet validated (at most _HANDLE_BATCH), and when the oldest of them was drained
        self._pending: list[bytes] = []
        self._pending_since = 0.0
        #: one drainer at a time (the receiving thread or the daemon's tick): records stay in arrival order
        #: and the token bucket is not updated twice at once
        self._handle_lock = threading.Lock()

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
        # non-blocking, waited on with poll(): one wake-up per burst of datagrams (drained without waiting),
        # none while idle with nothing pending; stop() wakes it with an empty datagram
        sock.setblocking(False)
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
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        # the arrival rate, measured over windows of about a second (one drain's count is too noisy: a
        # pause before it would stretch the next wait past what the queue holds at the real rate)
        wait, since, counted = 0.0, time.monotonic(), 0
        while not self._stop.is_set():
            # sleep until a record is queued (stop() sends an empty datagram), or drained ones are due
            timeout_ms = None
            if self._pending:
                left = self._pending_since + self.handle_interval_s - time.monotonic()
                timeout_ms = max(0, math.ceil(left * 1e3))
            if poller.poll(timeout_ms) and wait:
                time.sleep(wait)  # let more gather: one wake-up per few records, not per record
            with self._handle_lock:
                n = self._drain_locked()
                now = time.monotonic()
                if len(self._pending) >= _HANDLE_BATCH or (
                        self._pending and now - self._pending_since >= self.handle_interval_s):
                    self._handle_pending_locked()
            # the next wait: at the rate of the last second the queue reaches about _BATCH_TARGET records,
            # less a burst of one record per GPU at each end; none when the rate leaves no room (several busy
            # GPUs: they come in bursts anyway)
            counted += n
            if now - since >= 1.0:
                rate = counted / (now - since)
                room = _BATCH_TARGET - 2 * max(1, self.timeline.gpu_count())
                wait = min(self.batch_delay_s, room / rate) if rate and room > 0 else 0.0
                since, counted = now, 0
        self.flush()  # what was queued before stop() is handled, not lost

    def flush(self) -> int:
        """Receive every datagram queued on the socket and validate every received one, in arrival order;
        returns how many were validated.

        The receiving thread validates in batches (module docstring); the daemon calls this before it
        attributes (and before polling a sampler that reads the steps), so that they see every step the
        shims have sent."""
        with self._handle_lock:
            self._drain_locked()
            return self._handle_pending_locked()

    def _drain_locked(self) -> int:
        """Move the datagrams queued on the socket to ``_pending`` (validating a full batch on the way);
        returns how many."""
        sock = self._sock
        if sock is None:
            return 0
        size = self.max_record_bytes + 1
        pending = self._pending
        n = 0
        while True:
            try:
                data = sock.recv(size)
            except (BlockingIOError, InterruptedError):
                return n
            except OSError as exc:
                if not self._stop.is_set():
                    log.warning("phase receiver: recv failed: %s", exc)
                    time.sleep(0.01)  # a persistent socket error must not spin
                return n
            if not data and self._stop.is_set():
                continue  # stop()'s wake-up, not a record
            if not pending:
                self._pending_since = time.monotonic()
            pending.append(data)
            n += 1
            if len(pending) >= _HANDLE_BATCH:
                self._handle_pending_locked()
                pending = self._pending  # a new list: the handled one is gone

    def _handle_pending_locked(self) -> int:
        batch, self._pending = self._pending, []
        for data in batch:
            self.handle(data)
        return len(batch)

    # ---------------------------------------------------------------- validation

    def handle(self, data: bytes) -> bool:
        """Validate one datagram; returns True if it was accepted. Never raises for bad input."""
        if len(data) > self.max_record_bytes:
            return self._reject("oversize", f"{len(data)} bytes > {self.max_record_bytes}")
        now = self.clock()
        if not self._take_token(now):
            return self._reject("rate_limited", f"over {self.max_rate_per_s:.0f} records/s")
        try:
            obj = json.loads(data)
            rec = fast_step(obj) or parse_record(obj)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._reject("malformed", f"not valid JSON: {exc}")
        except TraceFormatError as exc:
            return self._reject("malformed", str(exc))
        except (RecursionError, OverflowError) as exc:  # "[[[[..." nested past the limit; an integer too
            # large for a float: malformed too, and they must not end the receiving thread
            return self._reject("malformed", f"{type(exc).__name__}: {exc}")
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
        if self.known_gpus is None and rec.gpu_uuid not in self.learned_gpus:
            why = self._learn(rec.gpu_uuid)
            if why:
                return self._reject("unknown_gpu", why)
        # the whole step within [now - max_age, now + max_future]: a step ending far ahead would read as busy
        # time for minutes to come
        if rec.t1_ns < now - self.max_age_ns or rec.t1_ns > now + self.max_future_ns \
                or rec.t1_ns - rec.t0_ns > self.max_step_ns:
            return self._reject("time_range", f"step {rec.t0_ns}..{rec.t1_ns} ns is out of range at {now}")
        self.timeline.add_step(rec)
        self.state.observe_step(rec, received=True)
        if self.on_step:
            self.on_step(rec)
        return True

    def _learn(self, uuid: str) -> str | None:
        """Learn a GPU from a record; the reason it is refused, or None."""
        if not (uuid.startswith(("GPU-", "MIG-")) and uuid.isprintable() and " " not in uuid):
            return f"{uuid!r} is not a GPU UUID (GPU-... or MIG-...)"
        if len(self.learned_gpus) >= self.max_gpus:
            return f"GPU {uuid!r} is one more than the {self.max_gpus} GPUs this agent learns at most"
        self.learned_gpus.add(uuid)
        return None

    def _take_token(self, now: int) -> bool:
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
