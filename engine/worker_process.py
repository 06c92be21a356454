"""One engine worker process: an ``LLMEngine`` loop fed by the front-end over :mod:`protocol` queues.

One process per GPU (or N on CPU). The process side (:class:`WorkerLoop`) reads commands, runs
``engine.step()`` while any request is unfinished, and sends one :class:`~protocol.StepReport` per step.
The front-end side (:class:`WorkerProcess`) starts the process, sends commands, and runs one reader thread
that hands every event to a callback and notices the process's death within ``poll_s``.

Processes are started with ``spawn``: the front-end runs threads (uvicorn) and torch, and forking either
is unsafe.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from phaselens.engine import protocol
from phaselens.phase import Role

log = logging.getLogger(__name__)

#: builds the engine inside the worker process; "module:function" so that ``spawn`` can import it
DEFAULT_ENGINE_FACTORY = "phaselens.engine.worker_process:build_engine"


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to build its engine and serve."""

    worker_id: str
    role: Role = Role.COLOCATED
    #: keyword arguments of ``EngineConfig`` (model, device, block_size, shim flags, ...)
    engine_args: dict[str, Any] = field(default_factory=dict)
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    #: torch intra-op threads on CPU (None: torch's default); N CPU workers share the cores
    torch_threads: int | None = None
    #: an idle worker reports its stats this often, so gauges never go stale
    heartbeat_s: float = 0.5


def build_engine(config: WorkerConfig) -> Any:
    """The default factory: the real engine core (``phaselens.engine.llm_engine``)."""
    from phaselens.engine.llm_engine import EngineConfig, LLMEngine

    args = dict(config.engine_args)
    args.setdefault("role", config.role)
    args.setdefault("engine_id", config.worker_id)
    return LLMEngine(EngineConfig(**args))


def _load_factory(spec: str) -> Callable[[WorkerConfig], Any]:
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    if not callable(factory):
        raise TypeError(f"engine factory {spec!r} is not callable")
    return factory


def stats_dict(stats: Any) -> dict[str, Any]:
    """An ``EngineStats`` as a plain picklable dict, phase keys as their lowercase names."""
    if stats is None:
        return {}
    is_instance = dataclasses.is_dataclass(stats) and not isinstance(stats, type)
    raw = dataclasses.asdict(stats) if is_instance else dict(vars(stats))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            value = {getattr(k, "value", k): v for k, v in value.items()}
        out[key] = value
    return out


def _step_phase(before: dict[str, Any], after: dict[str, Any]) -> tuple[str | None, float | None]:
    """The phase of the step between two stats snapshots: the one whose step counter moved."""
    steps_b, steps_a = before.get("steps_by_phase") or {}, after.get("steps_by_phase") or {}
    for phase, count in steps_a.items():
        if count > steps_b.get(phase, 0):
            secs_b = (before.get("step_seconds_by_phase") or {}).get(phase, 0.0)
            secs_a = (after.get("step_seconds_by_phase") or {}).get(phase)
            return str(phase), (None if secs_a is None else max(0.0, secs_a - secs_b))
    return None, None


def _tokens_by_kind(before: dict[str, Any], after: dict[str, Any], outputs: list[Any]) -> tuple[int, int]:
    """Prefill and decode tokens the step ran.

    From the engine's cumulative ``prefill_tokens``/``decode_tokens`` counters when its stats keep them;
    otherwise from the outputs: each output past a request's first token is one decode token, and a
    request's first token completes its prefill of ``prompt - cached`` tokens (all counted in that step,
    though chunked prefill spread them over earlier steps too).
    """
    if "prefill_tokens" in after and "decode_tokens" in after:
        return (max(0, int(after["prefill_tokens"]) - int(before.get("prefill_tokens", 0))),
                max(0, int(after["decode_tokens"]) - int(before.get("decode_tokens", 0))))
    prefill = decode = 0
    for out in outputs:
        if len(out.output_token_ids) == 1:
            prefill += max(0, out.num_prompt_tokens - out.num_cached_tokens)
        elif out.new_token_ids:
            decode += len(out.new_token_ids)
    return prefill, decode


class WorkerLoop:
    """The process side: build the engine, then serve commands until :class:`~protocol.Shutdown`."""

    def __init__(self, config: WorkerConfig, commands: Any, events: Any):
        self.config = config
        self.commands = commands
        self.events = events
        self.engine: Any = None
        self.active: set[str] = set()
        self.role = config.role
        #: hand-offs waiting for free KV blocks here, oldest first
        self.pending: deque[protocol.ContinueRequest] = deque()
        self._last_heartbeat = 0.0

    def run(self) -> None:
        cfg = self.config
        try:
            if cfg.torch_threads:
                import torch
                torch.set_num_threads(cfg.torch_threads)
            self.engine = _load_factory(cfg.engine_factory)(cfg)
            self.events.put(protocol.WorkerReady(
                worker_id=cfg.worker_id, role=cfg.role, pid=os.getpid(),
                model_name=self.engine.model_config.name, max_model_len=int(self.engine.max_model_len),
                device=str(cfg.engine_args.get("device", "cpu")),
                vocab_size=int(self.engine.model_config.vocab_size),
                gpu_uuid=cfg.engine_args.get("gpu_uuid"), kv_handle=self._kv_handle()))
        except Exception as exc:  # report why start-up failed, then exit non-zero
            if not isinstance(exc, ValueError):  # a bad config is the user's error, not a bug: no traceback
                log.exception("worker %s failed to start", cfg.worker_id)
            self.events.put(protocol.WorkerFailed(cfg.worker_id, f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None
        try:
            self._serve()
        except Exception as exc:  # an engine bug: say so and die, the front-end fails the requests
            self.events.put(protocol.WorkerFailed(
                cfg.worker_id, f"engine loop crashed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            raise SystemExit(1) from None
        finally:
            close = getattr(self.engine, "close", None)
            if callable(close):
                close()

    def _kv_handle(self) -> protocol.KVHandle | None:
        """The engine's KV handle, if it can hand KV over (test engines cannot)."""
        get = getattr(self.engine, "kv_handle", None)
        return get() if callable(get) else None

    def _serve(self) -> None:
        parent = mp.parent_process()
        before = stats_dict(self.engine.stats())
        while True:
            busy = self.engine.has_unfinished_requests() or bool(self.pending)
            for cmd in self._drain(block=not busy):
                if isinstance(cmd, protocol.Shutdown):
                    return
                self._handle(cmd)
            self._admit_pending()
            if self.engine.has_unfinished_requests():
                before = self._step(before)
            else:
                now = time.monotonic()
                if now - self._last_heartbeat >= self.config.heartbeat_s:
                    self._last_heartbeat = now
                    before = stats_dict(self.engine.stats())
                    self.events.put(protocol.StatsReport(self.config.worker_id, before))
                if parent is not None and not parent.is_alive():
                    log.warning("worker %s: front-end is gone; exiting", self.config.worker_id)
                    return

    def _drain(self, block: bool) -> list[Any]:
        cmds: list[Any] = []
        try:
            if block:
                cmds.append(self.commands.get(timeout=self.config.heartbeat_s))
            while True:
                cmds.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _handle(self, cmd: Any) -> None:
        if isinstance(cmd, protocol.AddRequest):
            # a request sent to the prefill pool is parked after its first token (split mode)
            extra = {"handoff": True} if cmd.role is Role.PREFILL else {}
            try:
                self.engine.add_request(cmd.request_id, list(cmd.prompt_token_ids), cmd.params,
                                        arrival_ns=cmd.arrival_ns, **extra)
            except ValueError as exc:
                self.events.put(protocol.RequestRejected(cmd.request_id, str(exc)))
                return
            self.active.add(cmd.request_id)
        elif isinstance(cmd, protocol.AbortRequest):
            if cmd.request_id in self.active:
                self.active.discard(cmd.request_id)
                self.engine.abort_request(cmd.request_id)
            for waiting in [p for p in self.pending if p.handoff.request_id == cmd.request_id]:
                self.pending.remove(waiting)
                self._report_failed(waiting, "aborted while waiting for KV blocks")
        elif isinstance(cmd, protocol.ContinueRequest):
            self._continue(cmd, first_try=True)
        elif isinstance(cmd, protocol.ReleaseKV):
            if cmd.request_id in self.active:
                self.active.discard(cmd.request_id)
                self.engine.release(cmd.request_id)
        elif isinstance(cmd, protocol.SetRole):
            self._set_role(cmd)
        else:
            log.warning("worker %s: unknown command %r ignored", self.config.worker_id, cmd)

    # -- split mode

    def _set_role(self, cmd: protocol.SetRole) -> None:
        """Take the role and answer :class:`~protocol.RoleSet`: the mode change's health check."""
        set_role = getattr(self.engine, "set_role", None)
        try:
            if callable(set_role):
                set_role(cmd.role, cmd.peers)
        except Exception as exc:  # the worker cannot serve in the new mode: the front-end rolls back
            self.events.put(protocol.RoleSet(self.config.worker_id, cmd.role, cmd.token, ok=False,
                                             message=f"{type(exc).__name__}: {exc}"))
            return
        self.role = cmd.role
        self.events.put(protocol.RoleSet(self.config.worker_id, cmd.role, cmd.token))

    def _continue(self, cmd: protocol.ContinueRequest, first_try: bool) -> bool:
        """Take over a parked request; False when it has to wait for free blocks or a batch slot (queued if
        first_try, behind those already waiting)."""
        rid = cmd.handoff.request_id
        if first_try and self.pending:
            self.pending.append(cmd)
            return False
        if cmd.source is None:  # parked here: continue in place, once the batch has room
            if not self.engine.can_attach():
                if first_try:
                    self.pending.append(cmd)
                return False
            if self.engine.resume(rid):
                return True
            self._report_failed(cmd, f"request {rid} is not parked on worker {self.config.worker_id}")
            return True
        try:
            result = self.engine.add_transferred(cmd.handoff, cmd.source)
        except Exception as exc:  # a bad hand-off fails this request only, never the worker
            self._report_failed(cmd, f"{type(exc).__name__}: {exc}")
            return True
        if result is None:
            if not self.engine.has_unfinished_requests() and not first_try:
                self._report_failed(cmd, f"request {rid} needs more KV blocks than worker "
                                         f"{self.config.worker_id} has free with nothing running")
                return True
            if first_try:
                self.pending.append(cmd)
            return False
        self.active.add(rid)
        self.events.put(protocol.KVTransferred(
            self.config.worker_id, rid, cmd.source.worker_id, result.blocks_moved, result.blocks_cached,
            result.bytes, result.seconds))
        return True

    def _admit_pending(self) -> None:
        """Retry hand-offs that waited for blocks or a batch slot, oldest first, until one still does not
        fit."""
        while self.pending:
            if not self._continue(self.pending[0], first_try=False):
                return
            self.pending.popleft()

    def _report_failed(self, cmd: protocol.ContinueRequest, message: str) -> None:
        source = None if cmd.source is None else cmd.source.worker_id
        log.warning("worker %s: hand-off of %s failed: %s", self.config.worker_id, cmd.handoff.request_id,
                    message)
        self.events.put(protocol.TransferFailed(self.config.worker_id, cmd.handoff.request_id, source,
                                                message))

    def _step(self, before: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time_ns()
        outputs = self.engine.step()
        t1 = time.time_ns()
        after = stats_dict(self.engine.stats())
        phase, seconds = _step_phase(before, after)
        prefill_tokens, decode_tokens = _tokens_by_kind(before, after, outputs)
        deltas = []
        for out in outputs:
            if out.request_id not in self.active:
                continue  # aborted while this step ran: the front-end no longer waits for it
            if out.finished:
                self.active.discard(out.request_id)
            if not out.new_token_ids and not out.finished:
                continue
            deltas.append(protocol.TokenDelta(
                request_id=out.request_id, new_token_ids=list(out.new_token_ids),
                num_output_tokens=len(out.output_token_ids), num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens, finished=out.finished,
                finish_reason=out.finish_reason, text=out.text if out.finished else None))
        self.events.put(protocol.StepReport(
            worker_id=self.config.worker_id, outputs=deltas, t0_ns=t0, t1_ns=t1, phase=phase,
            step_seconds=seconds if seconds is not None else (t1 - t0) / 1e9,
            prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, stats=after))
        take = getattr(self.engine, "take_handoffs", None)
        for handoff in (take() if callable(take) else ()):
            if handoff.request_id in self.active:
                self.events.put(protocol.KVReady(self.config.worker_id, handoff))
        return after


def worker_main(config: WorkerConfig, commands: Any, events: Any) -> None:
    """Entry point of a worker process."""
    logging.basicConfig(level=os.environ.get("PHASELENS_LOG_LEVEL", "WARNING").upper(),
                        format=f"%(asctime)s %(levelname)s worker {config.worker_id} %(name)s: %(message)s")
    WorkerLoop(config, commands, events).run()


EventCallback = Callable[["WorkerProcess", Any], None]
ExitCallback = Callable[["WorkerProcess", "int | None"], None]


class WorkerProcess:
    """The front-end's handle on one worker process: start, send, watch.

    ``on_event(worker, event)`` runs on this worker's reader thread for every event;
    ``on_exit(worker, exitcode)`` runs once on that thread when the process is found dead (after the
    events it sent before dying were delivered).
    """

    def __init__(self, config: WorkerConfig, on_event: EventCallback, on_exit: ExitCallback,
                 poll_s: float = 0.05, mp_context: Any = None):
        self.config = config
        self.worker_id = config.worker_id
        self.role = config.role
        self._on_event = on_event
        self._on_exit = on_exit
        self._poll_s = poll_s
        self._ctx = mp_context or mp.get_context("spawn")
        self.commands = self._ctx.Queue()
        self.events = self._ctx.Queue()
        self.process: Any = None
        self.ready: protocol.WorkerReady | None = None
        self.failure: str | None = None
        self.exitcode: int | None = None
        self._ready_event = threading.Event()
        self._dead = threading.Event()
        self._stopping = False
        self._reader: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        self.process = self._ctx.Process(target=worker_main, args=(self.config, self.commands, self.events),
                                         name=f"phaselens-worker-{self.worker_id}", daemon=True)
        self.process.start()
        self._reader = threading.Thread(target=self._read_events, name=f"events-{self.worker_id}",
                                        daemon=True)
        self._reader.start()

    def wait_ready(self, timeout_s: float) -> protocol.WorkerReady:
        """Block until the engine is built. RuntimeError says why it did not start."""
        deadline = time.monotonic() + timeout_s
        while not self._ready_event.wait(0.05):
            if self._dead.is_set():
                why = self.failure or f"exited with code {self.exitcode} before it was ready"
                raise RuntimeError(f"worker {self.worker_id} failed to start: {why}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.worker_id} not ready after {timeout_s:.0f} s")
        assert self.ready is not None
        return self.ready

    @property
    def alive(self) -> bool:
        return self.process is not None and not self._dead.is_set() and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def send(self, cmd: Any) -> None:
        """Queue a command (never blocks: the queue's feeder thread writes it); dropped once stopped."""
        if self.commands is not None:
            self.commands.put(cmd)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it has not after ``timeout_s``."""
        self._stopping = True
        if self.process is None:
            return
        if self.process.is_alive():
            self.send(protocol.Shutdown())
            self.process.join(timeout_s)
        if self.process.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", self.worker_id, timeout_s)
            self.process.kill()
            self.process.join(timeout_s)
        if self._reader is not None:
            self._reader.join(timeout_s)
        # close and drop the queues now: their semaphores are unregistered when the queues are collected,
        # which at interpreter exit never happens (the resource tracker then warns about "leaked" ones)
        for q in (self.commands, self.events):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self.commands = self.events = None

    # -- the reader thread

    def _read_events(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=self._poll_s)
            except queue.Empty:
                if self.process.is_alive():
                    continue
                break
            except (EOFError, OSError) as exc:  # the pipe broke under a dying writer
                log.warning("worker %s: event queue broke: %s", self.worker_id, exc)
                break
            if isinstance(event, protocol.WorkerReady):
                self.ready = event
                self._ready_event.set()
            elif isinstance(event, protocol.WorkerFailed):
                self.failure = event.message
            try:
                self._on_event(self, event)
            except Exception:  # a bug in the front-end's handler must not kill the reader
                log.exception("worker %s: event handler failed on %r", self.worker_id, type(event).__name__)
        self.process.join(1.0)
        self.exitcode = self.process.exitcode
        self._dead.set()
        if not self._stopping:
            log.error("worker %s (pid %s) died: exit code %s%s", self.worker_id, self.process.pid,
                      self.exitcode, f" ({self.failure.splitlines()[0]})" if self.failure else "")
        self._on_exit(self, self.exitcode)
