"""The OpenAI-compatible HTTP front-end: FastAPI app, worker processes, router, streaming.

The front-end tokenizes and validates each request, routes it to the least-loaded live worker
(:mod:`router`), sends it over the worker protocol (:mod:`protocol`), detokenizes the tokens that come back
and streams them. It also measures the request latencies (:mod:`metrics`) and writes the request log
(:mod:`request_log`). Endpoints:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: non-streaming, or SSE with ``data: [DONE]``;
  ``usage`` has ``prompt_tokens_details.cached_tokens`` (``stream_options.include_usage`` when streaming).
  Extensions (as vLLM names them): ``top_k``, ``ignore_eos``; header ``X-Session-ID`` tags the request log.
- ``GET /admin/mode``, ``POST /admin/mode`` (``{"mode": "split", "prefill": 1, "decode": 1}`` or
  ``{"mode": "colocated"}``): the worker pools, changed at run time (split-pool mode, issue 6). Bearer
  token (``ServerConfig.admin_token``; none configured: the admin API is off, 404); loopback callers only
  unless ``admin_remote``; 401 for a missing or wrong token, 403 for a remote caller, 400 naming a bad
  request (nothing changed), 409 while another change runs, 503 when the new mode's workers failed their
  health check and the change was rolled back.
- ``GET /v1/models``, ``GET /v1/models/{model}`` (404 ``model_not_found`` for another id), ``GET /health``
  (200 ``ok``; 200 ``degraded`` when a worker died and one still lives; 503 ``unavailable`` when none
  does; per-worker state in the body), ``GET /metrics``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: bad input is 400 naming the
field in ``param``, a full queue 503 with ``Retry-After``, no live worker 503, a worker that died under a
request 500 (a bug of the front-end's own: 500 ``internal_error``). A stream that fails after its first
token ends with one ``data: {"error": ...}`` event and no ``[DONE]``.

Chat template of the byte-level presets (the random-weight models have no template of their own), also
used for Hugging Face folders::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ... <|assistant|>\\n

one ``<|{role}|>`` line and the content, then a newline, per message; the prompt ends with
``<|assistant|>\\n`` so the model answers as the assistant. Roles ``system``, ``developer`` (written as
``system``), ``user``, ``assistant``; content a string or a list of ``{"type": "text"}`` parts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phaselens.engine import protocol
from phaselens.engine.metrics import EngineMetrics
from phaselens.engine.request_log import RequestLog, RequestRecord
from phaselens.engine.router import NoWorkerAvailable, Router
from phaselens.engine.sampling_params import SamplingParams, SamplingParamsError
from phaselens.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from phaselens.engine.worker_process import WorkerConfig, WorkerProcess
from phaselens.phase import Role

log = logging.getLogger(__name__)

# -- request bodies (OpenAI's field names and defaults; strict types: "5" is not an integer)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions, as vLLM names them
    top_k: int = 0
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ModeRequest(BaseModel):
    """Body of ``POST /admin/mode``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    mode: str
    prefill: int | None = None
    decode: int | None = None
    #: seconds the new mode's workers have to pass their health check (default: the server's)
    health_timeout_s: float | None = None


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _valid_text(text: str, param: str) -> str:
    """``text``, or a 400 naming ``param`` when it holds a lone UTF-16 surrogate: JSON's ``\\ud800`` escape
    lets a client send one, and no tokenizer can encode it (UTF-8 has no form for it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{param} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at "
                   f"character {exc.start}", param=param, code="invalid_unicode") from None
    return text


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def apply_chat_template(messages: list[ChatMessage]) -> str:
    """The documented byte-level chat template (module docstring). APIError for roles or parts we lack."""
    parts = []
    for i, msg in enumerate(messages):
        role = _ROLES.get(msg.role)
        if role is None:
            raise _bad(f"messages[{i}].role {msg.role!r} is not supported "
                       "(system, developer, user, assistant)",
                       param=f"messages[{i}].role")
        if msg.content is None:
            content = ""
        elif isinstance(msg.content, str):
            content = _valid_text(msg.content, f"messages[{i}].content")
        else:
            texts = []
            for j, part in enumerate(msg.content):
                if part.type != "text" or part.text is None:
                    raise _bad(f"messages[{i}].content[{j}]: only text parts are supported, "
                               f"got {part.type!r}",
                               param=f"messages[{i}].content")
                texts.append(_valid_text(part.text, f"messages[{i}].content"))
            content = "".join(texts)
        parts.append(f"<|{role}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


# -- per-request state


@dataclass
class RequestState:
    """One request in flight. Written by worker reader threads and the event loop, under ``lock``."""

    request_id: str
    role: Role
    prompt_tokens: int
    arrival_ns: int
    session_id: str | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    worker: str | None = None
    #: split mode: the worker holding this request's parked KV until the decode worker has copied it
    parked_on: str | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def push(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class ServerConfig:
    """How the front-end runs; worker engines are described by ``workers``."""

    model: str
    workers: list[WorkerConfig]
    #: the model id clients send; defaults to ``model``
    served_model_name: str | None = None
    #: most requests admitted and still waiting for their first token; more answer 503
    max_queue: int = 256
    request_log: str | None = None
    worker_start_timeout_s: float = 600.0
    hostname: str | None = None
    #: bearer token of the admin API (/admin/*); None: the admin API is off
    admin_token: str | None = None
    #: accept admin calls from non-loopback addresses too
    admin_remote: bool = False
    #: how long the workers of a new mode have to answer their health check before the change rolls back
    mode_health_timeout_s: float = 10.0
    #: largest request body accepted; larger ones get 413 before anything is parsed. 2 MiB holds a prompt
    #: of the longest context (131,072 tokens of ~4 bytes each, JSON-escaped) with room to spare.
    max_request_bytes: int = 2 << 20
    #: start a new process for a worker that dies (with a doubling backoff)
    restart_workers: bool = True


#: backoff before restarting a worker that died: doubles with each death in a row, up to the maximum
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0


class APIServer:
    """The front-end: owns the worker processes, the router, the metrics and the request log."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        self.model_name = config.served_model_name or config.model
        if tokenizer is None:
            from phaselens.engine.loader import resolve  # torch: only when serving a real model
            tokenizer = resolve(config.model).tokenizer()
        self.tokenizer = tokenizer
        self.router = Router()
        self.metrics = EngineMetrics(self.model_name, hostname=config.hostname)
        self.request_log = RequestLog(config.request_log)
        self.workers: dict[str, WorkerProcess] = {}
        self.worker_stats: dict[str, dict[str, Any]] = {}
        self.max_model_len = 0
        self.vocab_size = 0
        self._lock = threading.Lock()
        self._requests: dict[str, RequestState] = {}
        self._awaiting_first = 0
        self._ids = itertools.count()
        self.started_at = int(time.time())
        #: split mode: each worker's KV handle, from its WorkerReady
        self.kv_handles: dict[str, protocol.KVHandle] = {}
        #: the latest hand-offs (dicts), for GET /admin/mode and benchmarks
        self.transfers: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.mode_changes: list[dict[str, Any]] = []
        self._mode_lock = threading.Lock()
        self._acks: dict[int, protocol.RoleSet] = {}
        self._acks_cond = threading.Condition()
        self._tokens = itertools.count(1)
        #: consecutive deaths per worker id (the restart backoff); reset once a restarted worker is ready
        self._deaths: dict[str, int] = {}
        self._stopped = threading.Event()
        #: set once start() has every worker ready: a worker that dies before that fails the start-up, and
        #: restarting it would only log a restart of a server that is exiting
        self._serving = False
        self.app = self._build_app()

    @property
    def mode(self) -> str:
        """``split`` when any routable worker is a prefill worker, else ``colocated``."""
        roles = {w.role for w in self.router.loads() if w.routable}
        return "split" if Role.PREFILL in roles else "colocated"

    # -- lifecycle

    def start(self) -> None:
        """Start every worker and wait until all are ready. RuntimeError names a worker that failed."""
        for wc in self.config.workers:
            worker = WorkerProcess(wc, self._on_event, self._on_exit)
            self.workers[wc.worker_id] = worker
            self.router.add_worker(wc.worker_id, wc.role)
            worker.start()
        try:
            lens = []
            for worker in self.workers.values():
                ready = worker.wait_ready(self.config.worker_start_timeout_s)
                lens.append(ready.max_model_len)
                self.vocab_size = max(self.vocab_size, ready.vocab_size)
        except RuntimeError:
            self.stop()
            raise
        self.max_model_len = min(lens)
        self._serving = True
        self._publish_alive()

    def stop(self) -> None:
        self._stopped.set()  # no restarts from here on
        for worker in list(self.workers.values()):
            worker.stop()
        self.request_log.close()

    # -- events from the workers (reader threads)

    def _on_event(self, worker: WorkerProcess, event: Any) -> None:
        if isinstance(event, protocol.StepReport):
            self.worker_stats[worker.worker_id] = event.stats
            self.router.report_kv(worker.worker_id, event.stats.get("kv_free_blocks"))
            role = worker.role.value
            self.metrics.observe_step(worker.worker_id, role, event.phase, event.step_seconds,
                                      event.prefill_tokens, event.decode_tokens)
            self.metrics.update_engine_stats(worker.worker_id, role, event.stats)
            now = time.time_ns()
            for delta in event.outputs:
                self._on_delta(delta, now)
        elif isinstance(event, protocol.StatsReport):
            self.worker_stats[worker.worker_id] = event.stats
            self.router.report_kv(worker.worker_id, event.stats.get("kv_free_blocks"))
            self.metrics.update_engine_stats(worker.worker_id, worker.role.value, event.stats)
        elif isinstance(event, protocol.RequestRejected):
            state = self._get(event.request_id)
            if state is not None:
                self._finalize(state, "error", None)
                state.push(("error", _bad(event.message, param="prompt")))
        elif isinstance(event, protocol.WorkerReady):
            if event.kv_handle is not None:
                self.kv_handles[worker.worker_id] = event.kv_handle
        elif isinstance(event, protocol.KVReady):
            self._hand_off(worker, event.handoff)
        elif isinstance(event, protocol.KVTransferred):
            self._transferred(worker, event)
        elif isinstance(event, protocol.TransferFailed):
            self._transfer_failed(worker, event)
        elif isinstance(event, protocol.RoleSet):
            with self._acks_cond:
                self._acks[event.token] = event
                self._acks_cond.notify_all()

    # -- split mode: the hand-off (worker reader threads)

    def _hand_off(self, source: WorkerProcess, handoff: protocol.Handoff) -> None:
        """A prefill worker parked a request: continue it on a decode worker (in colocated mode: in place)."""
        rid = handoff.request_id
        state = self._get(rid)
        if state is None or state.done:  # the client went away meanwhile
            source.send(protocol.ReleaseKV(rid))
            return
        remaining = handoff.params.max_tokens - (len(handoff.token_ids) - handoff.num_prompt_tokens)
        tokens = len(handoff.token_ids) + remaining
        need = -(-tokens // max(1, _block_size(self.kv_handles.get(source.worker_id))))
        self.router.release(rid)
        try:
            with self._lock:  # a mode change re-labels workers under this lock: see one mode or the other
                if self.mode == "split":
                    target = self.router.select(rid, tokens, Role.DECODE, need_blocks=need)
                elif source.alive and self._routable(source.worker_id):
                    # colocated (the mode changed under the request): the worker holding its KV goes on
                    target = source.worker_id
                    self.router.assign(rid, target, tokens)
                else:
                    target = self.router.select(rid, tokens, Role.COLOCATED, need_blocks=need)
        except NoWorkerAvailable as exc:
            source.send(protocol.ReleaseKV(rid))
            self._fail(state, f"no worker can continue the request after its prefill ({exc})", "no_worker")
            return
        with state.lock:
            state.worker = target
            state.parked_on = source.worker_id
        if target == source.worker_id:
            source.send(protocol.ContinueRequest(handoff, None))
        else:
            self.workers[target].send(protocol.ContinueRequest(handoff, self.kv_handles[source.worker_id]))

    def _routable(self, worker_id: str) -> bool:
        return any(w.worker_id == worker_id and w.routable and w.alive for w in self.router.loads())

    def _transferred(self, worker: WorkerProcess, event: protocol.KVTransferred) -> None:
        state = self._get(event.request_id)
        if state is not None:
            with state.lock:
                state.parked_on = None
        source = self.workers.get(event.source_worker)
        if source is not None and source.alive:
            source.send(protocol.ReleaseKV(event.request_id))
        self.metrics.observe_kv_transfer(worker.role.value, event.seconds, event.bytes)
        self.transfers.append({"request_id": event.request_id, "source": event.source_worker,
                               "destination": worker.worker_id, "blocks_moved": event.blocks_moved,
                               "blocks_cached": event.blocks_cached, "bytes": event.bytes,
                               "seconds": event.seconds})
        if state is None or state.done:  # aborted while it moved: stop it at its new worker
            worker.send(protocol.AbortRequest(event.request_id))

    def _transfer_failed(self, worker: WorkerProcess, event: protocol.TransferFailed) -> None:
        source = self.workers.get(event.source_worker or worker.worker_id)
        if source is not None and source.alive:
            source.send(protocol.ReleaseKV(event.request_id))
        state = self._get(event.request_id)
        if state is not None:
            self._fail(state, f"the KV hand-off to worker {worker.worker_id} failed: {event.message}",
                       "kv_transfer_failed")

    def _fail(self, state: RequestState, message: str, code: str) -> None:
        log.error("request %s: %s", state.request_id, message)
        if self._finalize(state, "error", None):
            state.push(("error", APIError(500, message, type_="server_error", code=code)))

    def _on_delta(self, delta: protocol.TokenDelta, now: int) -> None:
        state = self._get(delta.request_id)
        if state is None:
            return  # aborted: the client went away
        with state.lock:
            if state.done:
                return
            state.output_tokens = delta.num_output_tokens
            state.cached_tokens = delta.num_cached_tokens
            state.prompt_tokens = delta.num_prompt_tokens or state.prompt_tokens
        if delta.new_token_ids:
            state.push(("tokens", list(delta.new_token_ids)))
        if delta.finished:
            state.push(("finish", delta.finish_reason or "stop", delta.text))

    def _served(self, state: RequestState, n: int) -> None:
        """``n`` tokens are being handed to the HTTP layer now (event loop): time them.

        TTFT and inter-token latency are taken here, not when the worker's event arrives, so they include
        the front-end's own queueing: what a client sees, less the network.
        """
        now = time.time_ns()
        role = state.role.value
        with state.lock:
            if state.done:
                return
            if state.first_token_ns is None:
                state.first_token_ns = now
                with self._lock:
                    self._awaiting_first -= 1
                self.metrics.observe_first_token(role, (now - state.arrival_ns) / 1e9)
                gaps = n - 1
            else:
                gaps = n
            if gaps and state.last_token_ns is not None:
                # several tokens served together: share the gap among them
                for _ in range(gaps):
                    self.metrics.observe_inter_token(role, (now - state.last_token_ns) / 1e9 / gaps)
            state.last_token_ns = now

    def _finished(self, state: RequestState, reason: str) -> None:
        self._finalize(state, "aborted" if reason == "abort" else "ok", reason)

    def _on_exit(self, worker: WorkerProcess, exitcode: int | None) -> None:
        orphans = self.router.mark_dead(worker.worker_id)
        self._publish_alive()
        if worker._stopping:
            return
        why = worker.failure.splitlines()[0] if worker.failure else f"exit code {exitcode}"
        for rid in orphans:
            state = self._get(rid)
            if state is None:
                continue
            parked = self.workers.get(state.parked_on or "")
            if parked is not None and parked is not worker and parked.alive:
                parked.send(protocol.ReleaseKV(rid))  # the decode worker died before it copied the KV
            self._finalize(state, "error", None)
            state.push(("error", APIError(
                500, f"worker {worker.worker_id} died while serving this request ({why})",
                type_="server_error", code="worker_died")))
        self._schedule_restart(worker)

    def _schedule_restart(self, dead: WorkerProcess) -> None:
        """Start a new process for a worker that died, after a backoff that doubles with each death in a row
        (1 s, 2 s, ... up to a minute): a worker that cannot start does not spin."""
        if self._stopped.is_set() or not self._serving or not self.config.restart_workers:
            return
        deaths = self._deaths[dead.worker_id] = self._deaths.get(dead.worker_id, 0) + 1
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (deaths - 1))
        log.warning("worker %s: restarting in %.0f s (death %d in a row)", dead.worker_id, delay, deaths)
        threading.Thread(target=self._restart, args=(dead, delay), name=f"restart-{dead.worker_id}",
                         daemon=True).start()

    def _restart(self, dead: WorkerProcess, delay_s: float) -> None:
        if self._stopped.wait(delay_s):
            return
        # the role it had at its death (a mode change may have moved it from its start-up role)
        config = replace(dead.config, role=dead.role)
        worker = WorkerProcess(config, self._on_event, self._on_exit)
        worker.start()
        try:
            worker.wait_ready(self.config.worker_start_timeout_s)
        except RuntimeError as exc:
            log.error("worker %s: restart failed: %s", dead.worker_id, exc)
            worker.stop()
            self._schedule_restart(dead)
            return
        if self._stopped.is_set():
            worker.stop()
            return
        dead.stop()  # its queues and reader thread
        with self._lock:
            self.workers[dead.worker_id] = worker
            self._deaths[dead.worker_id] = 0
        self.router.revive(dead.worker_id)
        self._publish_alive()
        log.warning("worker %s restarted (pid %s)", dead.worker_id, worker.pid)
        state = self.mode_state()
        if state["mode"] == "split":
            # the new process has a new KV cache: give every worker its role and peers again
            try:
                self.change_mode("split", state.get("prefill"), state.get("decode"))
            except (ValueError, ModeBusy, ModeRolledBack) as exc:
                log.error("worker %s restarted, but split mode could not be re-established: %s",
                          dead.worker_id, exc)

    def _publish_alive(self) -> None:
        for role in {w.role for w in self.workers.values()}:
            self.metrics.set_workers_alive(role.value, self.router.alive_count(role))

    # -- mode changes (POST /admin/mode)

    def mode_state(self) -> dict[str, Any]:
        """What ``GET /admin/mode`` answers: the mode, the pools, totals over the latest 1000 hand-offs, the
        latest 10 changes."""
        loads = self.router.loads()
        workers = [{"id": w.worker_id, "role": w.role.value if w.routable else "standby", "alive": w.alive,
                    "requests": w.requests} for w in loads]
        routable = [w for w in loads if w.routable and w.alive]
        count = {r.value: sum(1 for w in routable if w.role is r) for r in Role}
        moved = list(self.transfers)
        return {"mode": self.mode, "prefill": count["prefill"], "decode": count["decode"],
                "colocated": count["colocated"], "workers": workers,
                "kv_transfers": {"count": len(moved), "bytes": sum(t["bytes"] for t in moved),
                                 "blocks_moved": sum(t["blocks_moved"] for t in moved),
                                 "blocks_cached": sum(t["blocks_cached"] for t in moved)},
                "changes": self.mode_changes[-10:]}

    def plan_mode(self, mode: str, prefill: int | None, decode: int | None) -> dict[str, Role | None]:
        """Each worker's role in the asked-for mode (None: standby); ValueError names what is wrong."""
        live = sorted(w.worker_id for w in self.router.loads() if w.alive)
        if mode == "colocated":
            if prefill is not None or decode is not None:
                raise ValueError("prefill and decode counts apply to mode 'split' only")
            if not live:
                raise ValueError("no live worker to run colocated")
            return {w.worker_id: (Role.COLOCATED if w.alive else None) for w in self.router.loads()}
        if mode != "split":
            raise ValueError(f"mode must be 'colocated' or 'split', got {mode!r}")
        if prefill is None or decode is None:
            raise ValueError("mode 'split' needs both 'prefill' and 'decode' worker counts")
        if prefill < 1:
            raise ValueError(f"prefill must be at least 1 worker, got {prefill}")
        if decode < 1:
            raise ValueError(f"decode must be at least 1 worker, got {decode}: a split needs a decode worker")
        if prefill + decode > len(live):
            raise ValueError(f"prefill {prefill} + decode {decode} = {prefill + decode} workers, but only "
                             f"{len(live)} live worker(s) exist")
        missing = [w for w in live if w not in self.kv_handles]
        if missing:
            raise ValueError(f"worker(s) {', '.join(missing)} cannot hand KV over (engine without a KV "
                             "handle): split mode is not available")
        plan: dict[str, Role | None] = {w.worker_id: None for w in self.router.loads()}
        for i, wid in enumerate(live[:prefill + decode]):
            plan[wid] = Role.PREFILL if i < prefill else Role.DECODE
        return plan

    def change_mode(self, mode: str, prefill: int | None = None, decode: int | None = None,
                    health_timeout_s: float | None = None) -> dict[str, Any]:
        """Switch the pools; requests in flight finish where they are (or hand off by the mode they were
        sent in), new ones follow the new mode. ValueError: a bad request, nothing changed. ModeBusy:
        another change runs. ModeRolledBack: a worker of the new mode failed its health check."""
        timeout = self.config.mode_health_timeout_s if health_timeout_s is None else health_timeout_s
        if not timeout > 0:
            raise ValueError(f"health_timeout_s must be > 0, got {health_timeout_s}")
        plan = self.plan_mode(mode, prefill, decode)
        if not self._mode_lock.acquire(blocking=False):
            raise ModeBusy("another mode change is in progress")
        try:
            before = self.mode_state()
            old = {w.worker_id: (w.role if w.routable else None) for w in self.router.loads()}
            failures = self._health_check(plan, timeout)
            record: dict[str, Any] = {"at_ns": time.time_ns(), "from": before["mode"], "to": mode,
                                      "prefill": prefill, "decode": decode}
            if failures:
                # roll back: the workers take their old roles again; the router never saw the new ones
                self._health_check({w: r for w, r in old.items() if r is not None and plan.get(w) != r},
                                   timeout, wait=False)
                record.update(ok=False, rolled_back=True, error="; ".join(failures))
                self.mode_changes.append(record)
                log.error("mode change to %s rolled back: %s", mode, record["error"])
                raise ModeRolledBack(f"mode change to {mode!r} rolled back: {record['error']}")
            with self._lock:  # submit() and hand-offs see the old roles or the new, never a mix
                record["in_flight"] = len(self._requests)
                self.router.set_roles(plan)
                for wid, role in plan.items():
                    if role is not None:
                        self.workers[wid].role = role
            self._publish_alive()
            record.update(ok=True, rolled_back=False)
            self.mode_changes.append(record)
            log.warning("mode changed: %s -> %s (%s)", before["mode"], mode,
                        ", ".join(f"{w}={r.value if r else 'standby'}" for w, r in sorted(plan.items())))
            return self.mode_state()
        finally:
            self._mode_lock.release()

    def _health_check(self, plan: dict[str, Role | None], timeout_s: float, wait: bool = True) -> list[str]:
        """Send each worker of ``plan`` its role (decode workers open the prefill workers' KV caches) and
        wait for every answer; returns what failed (empty: all passed)."""
        peers = tuple(self.kv_handles[w] for w, r in sorted(plan.items()) if r is Role.PREFILL)
        tokens: dict[int, str] = {}
        failures: list[str] = []
        for wid, role in sorted(plan.items()):
            if role is None:
                continue
            worker = self.workers[wid]
            if not worker.alive:
                failures.append(f"worker {wid} is not alive")
                continue
            token = next(self._tokens)
            tokens[token] = wid
            worker.send(protocol.SetRole(role, token, peers if role is Role.DECODE else ()))
        if not wait:
            return failures
        deadline = time.monotonic() + timeout_s
        with self._acks_cond:
            while True:
                pending = [t for t in tokens if t not in self._acks]
                dead = [t for t in pending if not self.workers[tokens[t]].alive]
                left = deadline - time.monotonic()
                if not pending or dead or left <= 0:
                    break
                self._acks_cond.wait(min(left, 0.1))
            for token, wid in tokens.items():
                ack = self._acks.pop(token, None)
                if ack is None:
                    alive = self.workers[wid].alive
                    failures.append(f"worker {wid} " + (f"did not answer its health check in {timeout_s:g} s"
                                                        if alive else "died during the change"))
                elif not ack.ok:
                    failures.append(f"worker {wid} cannot be {ack.role.value}: {ack.message}")
        return failures

    def _check_admin(self, request: Request) -> None:
        """The admin API's gate: on, from this machine (unless admin_remote), with the bearer token."""
        token = self.config.admin_token
        if not token:
            raise APIError(404, "the admin API is off: start the server with --admin-token-file or "
                                "PHASELENS_ADMIN_TOKEN", type_="not_found_error", code="admin_off")
        host = request.client.host if request.client else None
        if not self.config.admin_remote and not _is_loopback(host):
            raise APIError(403, f"admin calls are accepted from this machine only, not from {host}; serve "
                                "with --admin-remote to allow other hosts",
                           type_="permission_error", code="admin_local_only")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "the admin API needs an 'Authorization: Bearer <token>' header",
                           type_="authentication_error", code="missing_token",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(401, "the admin token is wrong", type_="authentication_error",
                           code="invalid_token", headers={"WWW-Authenticate": "Bearer"})

    # -- request bookkeeping

    def _get(self, request_id: str) -> RequestState | None:
        with self._lock:
            return self._requests.get(request_id)

    def _finalize(self, state: RequestState, status: str, finish_reason: str | None,
                  now: int | None = None) -> bool:
        """Close a request once: release its load, count it, log it. False if it was already closed."""
        with state.lock:
            if state.done:
                return False
            state.done = True
            with self._lock:
                self._requests.pop(state.request_id, None)
                if state.first_token_ns is None:
                    self._awaiting_first -= 1
        now = now or time.time_ns()
        self.router.release(state.request_id)
        e2e = (now - state.arrival_ns) / 1e9
        tpot = None
        if state.first_token_ns is not None and state.output_tokens > 1:
            tpot = (now - state.first_token_ns) / 1e9 / (state.output_tokens - 1)
        self.metrics.observe_finished(state.role.value, status, e2e, tpot)
        self.request_log.write(RequestRecord(
            request_id=state.request_id, arrival_ns=state.arrival_ns, first_token_ns=state.first_token_ns,
            finish_ns=now, prompt_tokens=state.prompt_tokens, cached_tokens=state.cached_tokens,
            output_tokens=state.output_tokens, worker=state.worker, role=state.role.value, status=status,
            finish_reason=finish_reason, session_id=state.session_id))
        return True

    def abort(self, state: RequestState) -> None:
        """The client went away: stop the request in its worker (frees its KV blocks) and log it."""
        if not self._finalize(state, "aborted", "abort"):
            return
        worker = self.workers.get(state.worker or "")
        if worker is not None and worker.alive:
            worker.send(protocol.AbortRequest(state.request_id))

    def submit(self, prefix: str, prompt_ids: list[int], params: SamplingParams,
               session_id: str | None, arrival_ns: int, role: Role | None = None) -> RequestState:
        """Admit a request and send it to a worker. APIError 503 when the queue is full or no worker lives.

        ``role`` None: the current mode's entry pool (prefill in split mode, else colocated).
        """
        request_id = f"{prefix}-{uuid.uuid4().hex[:16]}{next(self._ids)}"
        state = RequestState(request_id=request_id, role=role or Role.COLOCATED,
                             prompt_tokens=len(prompt_ids),
                             arrival_ns=arrival_ns, session_id=session_id, queue=asyncio.Queue(),
                             loop=asyncio.get_running_loop())
        with self._lock:  # the mode is read and the worker picked under the lock a mode change takes
            if role is None:
                role = state.role = Role.PREFILL if self.mode == "split" else Role.COLOCATED
            if self._awaiting_first >= self.config.max_queue:
                self.metrics.count_rejected(role.value, "queue_full")
                raise APIError(503, f"the server is overloaded: {self._awaiting_first} requests are waiting "
                                    f"for their first token (--max-queue {self.config.max_queue}); "
                                    "retry later",
                               type_="overloaded_error", code="queue_full", headers={"Retry-After": "1"})
            try:
                state.worker = self.router.select(request_id, len(prompt_ids) + params.max_tokens, role)
            except NoWorkerAvailable as exc:
                self.metrics.count_rejected(role.value, "no_worker")
                raise APIError(503, f"no engine worker is available ({exc}); see /health",
                               type_="server_error", code="no_worker", headers={"Retry-After": "5"}) from None
            self._requests[request_id] = state
            self._awaiting_first += 1
        self.workers[state.worker].send(protocol.AddRequest(request_id, prompt_ids, params, arrival_ns, role))
        return state

    # -- validation shared by both endpoints

    def _check_common(self, body: _Common) -> None:
        if body.model != self.model_name:
            raise APIError(400, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        if body.n != 1:
            raise _bad(f"n={body.n} is not supported (only n=1)", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise _bad("presence_penalty and frequency_penalty are not supported (only 0)",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")
        if body.logit_bias:
            raise _bad("logit_bias is not supported", param="logit_bias")

    def _params(self, body: _Common, max_tokens: int | None, prompt_len: int,
                default_max: int | None, max_param: str = "max_tokens") -> SamplingParams:
        """The request's sampling parameters; a 400 names the field at fault (``max_param``: the field the
        output length came from, ``max_completion_tokens`` for a chat request that used it)."""
        room = self.max_model_len - prompt_len
        if prompt_len < 1:
            raise _bad("the prompt is empty", param="prompt")
        if max_tokens is not None and max_tokens < 1:
            raise _bad(f"{max_param} must be at least 1, got {max_tokens}", param=max_param)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = prompt_len + (max_tokens or 1)
            raise _bad(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                       f"requested {asked} tokens ({prompt_len} in the prompt, {max_tokens or 1} for the "
                       f"completion). Please reduce the prompt or the completion length.",
                       param=max_param if room >= 1 else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
        for s in stop:
            _valid_text(s, "stop")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, stop=tuple(stop),
                                  ignore_eos=body.ignore_eos)
        except SamplingParamsError as exc:
            raise _bad(str(exc), param=max_param if exc.param == "max_tokens" else exc.param) from None

    def _completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _bad(f"batched prompts are not supported ({len(prompt)} prompts); send one per request",
                           param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(_valid_text(prompt, "prompt"))
        ids = [int(t) for t in prompt]  # type: ignore[arg-type]  # list[int] here: str lists left above
        bad = [t for t in ids if t < 0 or (self.vocab_size and t >= self.vocab_size)]
        if bad:
            raise _bad(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})", param="prompt")
        return ids

    # -- the app

    def _build_app(self) -> FastAPI:
        server = self

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            # uvicorn is stopping: stop the workers too
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

        app = FastAPI(title="phaselens engine", docs_url=None, redoc_url=None, lifespan=lifespan)
        app.add_middleware(_BodyLimit, max_bytes=server.config.max_request_bytes,
                           on_reject=lambda: server.metrics.count_rejected(Role.COLOCATED.value, "too_large"))
        app.add_middleware(_ArrivalStamp)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            # FastAPI's own errors (a body that is not UTF-8, an unknown route, a wrong method) in the
            # OpenAI shape, and counted when they are the client's bad request
            if isinstance(exc.__cause__, _BodyTooLarge):  # a chunked body past the cap, while FastAPI read it
                server.metrics.count_rejected(Role.COLOCATED.value, "too_large")
                return APIError(413, f"the request body is larger than {server.config.max_request_bytes} "
                                "bytes", code="request_too_large").response()
            if exc.status_code == 400:
                server.metrics.count_rejected(Role.COLOCATED.value, "bad_request")
            message = str(exc.detail) if exc.status_code != 400 else \
                f"the body could not be read ({exc.detail}): send UTF-8 JSON"
            type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return APIError(exc.status_code, message, type_=type_, headers=getattr(exc, "headers", None)
                            ).response()

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            server.metrics.count_rejected(Role.COLOCATED.value, "bad_request")
            errors = exc.errors()
            first = errors[0] if errors else {}
            if first.get("type") == "json_invalid":
                return _bad(f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                            code="json_invalid").response()
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            param = ".".join(loc) or None
            msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                             f"{e.get('msg')}" for e in errors[:5])
            return _bad(f"invalid request: {msgs}", param=param).response()

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError) -> JSONResponse:
            if exc.status == 400:
                server.metrics.count_rejected(Role.COLOCATED.value, "bad_request")
            return exc.response()

        @app.exception_handler(Exception)
        async def _internal(request: Request, exc: Exception) -> JSONResponse:
            # a bug of ours still answers in the OpenAI shape (clients parse it); Starlette re-raises the
            # exception after this response, so its traceback reaches the server log
            return APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                            type_="server_error", code="internal_error").response()

        @app.get("/admin/mode")
        async def get_mode(request: Request) -> dict[str, Any]:
            server._check_admin(request)
            return server.mode_state()

        @app.post("/admin/mode")
        async def set_mode(request: Request) -> dict[str, Any]:
            server._check_admin(request)  # before the body is even parsed
            try:
                body = ModeRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                errors = exc.errors()
                where = (".".join(str(p) for p in errors[0]["loc"]) if errors else "") or "body"
                raise _bad(f"invalid mode request: {where}: {errors[0]['msg'] if errors else 'invalid'}",
                           param=where) from None
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    None, server.change_mode, body.mode, body.prefill, body.decode, body.health_timeout_s)
            except ValueError as exc:
                raise _bad(str(exc), param="mode", code="invalid_mode") from None
            except ModeBusy as exc:
                raise APIError(409, str(exc), type_="conflict_error",
                               code="mode_change_in_progress") from None
            except ModeRolledBack as exc:
                raise APIError(503, str(exc), type_="server_error", code="mode_change_rolled_back") from None

        def model_card() -> dict[str, Any]:
            return {"id": server.model_name, "object": "model", "created": server.started_at,
                    "owned_by": "phaselens", "max_model_len": server.max_model_len}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [model_card()]}

        # ":path": a served name may hold slashes ("meta-llama/Llama-3.2-1B"), as Hugging Face ids do
        @app.get("/v1/models/{model:path}")
        async def model(model: str) -> dict[str, Any]:
            if model != server.model_name:
                raise APIError(404, f"The model {model!r} does not exist; this server serves "
                                    f"{server.model_name!r}", param="model", code="model_not_found")
            return model_card()

        @app.get("/health")
        async def health() -> JSONResponse:
            return server.health()

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            arrival = _arrival_ns(request)
            server._check_common(body)
            unsupported = {"echo": body.echo, "logprobs": body.logprobs is not None,
                           "best_of": body.best_of not in (None, 1), "suffix": body.suffix is not None}
            for name, given in unsupported.items():
                if given:
                    raise _bad(f"{name} is not supported", param=name)
            ids = server._completion_prompt(body)
            params = server._params(body, body.max_tokens, len(ids), default_max=16)
            return await server._respond("cmpl", ids, params, body, request, arrival, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            arrival = _arrival_ns(request)
            server._check_common(body)
            if body.logprobs or body.top_logprobs:
                raise _bad("logprobs are not supported", param="logprobs")
            if body.tools:
                raise _bad("tools are not supported", param="tools")
            if body.response_format and body.response_format.get("type") != "text":
                raise _bad("response_format other than text is not supported", param="response_format")
            ids = server.tokenizer.encode(apply_chat_template(body.messages))
            max_tokens, max_param = body.max_completion_tokens, "max_completion_tokens"
            if max_tokens is None:
                max_tokens, max_param = body.max_tokens, "max_tokens"
            params = server._params(body, max_tokens, len(ids), default_max=None, max_param=max_param)
            return await server._respond("chatcmpl", ids, params, body, request, arrival, chat=True)

        return app

    def health(self) -> JSONResponse:
        loads = {w.worker_id: w for w in self.router.loads()}
        workers = []
        for wid, worker in self.workers.items():
            alive = worker.alive
            stats = self.worker_stats.get(wid, {})
            workers.append({
                "id": wid, "role": worker.role.value if loads.get(wid) is None or loads[wid].routable
                else "standby", "alive": alive, "pid": worker.pid,
                "exitcode": None if alive else worker.exitcode,
                "error": None if alive else (worker.failure or f"exited with code {worker.exitcode}"),
                "requests": loads[wid].requests if wid in loads else 0,
                "num_running": stats.get("num_running"), "num_waiting": stats.get("num_waiting"),
                "kv_usage": stats.get("kv_usage")})
        alive = sum(1 for w in workers if w["alive"])
        status = "ok" if alive == len(workers) else ("degraded" if alive else "unavailable")
        with self._lock:
            inflight, waiting = len(self._requests), self._awaiting_first
        body = {"status": status, "model": self.model_name, "mode": self.mode, "workers": workers,
                "requests_in_flight": inflight, "requests_awaiting_first_token": waiting,
                "max_queue": self.config.max_queue}
        return JSONResponse(body, status_code=200 if alive else 503)

    # -- responses

    async def _respond(self, prefix: str, ids: list[int], params: SamplingParams, body: _Common,
                       request: Request, arrival_ns: int, chat: bool) -> Response:
        session = request.headers.get("x-session-id")
        state = self.submit(prefix, ids, params, session, arrival_ns)
        stream = _TextStream(self.tokenizer, params.stop)
        # the body is read: the next ASGI message is the client's disconnect, if it comes
        gone = _DisconnectWatch(request)
        try:
            if not body.stream:
                text, reason = await self._collect(state, stream, gone)
                return JSONResponse(self._full_body(state, body, text, reason, chat))
            # wait for the first item before answering, so a request that fails at once gets a real status
            first = await gone.next(state.queue)
        except (asyncio.CancelledError, _ClientGone):
            self.abort(state)  # frees the request's KV blocks in its worker
            if isinstance(gone.error, _ClientGone):
                return Response(status_code=499)  # nobody reads it: the connection is closed
            raise
        finally:
            gone.stop()  # before StreamingResponse starts listening for the disconnect itself
        if first[0] == "error":
            raise first[1]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse(state, stream, body, first, include_usage, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-ID": state.request_id})

    async def _collect(self, state: RequestState, stream: "_TextStream",
                       gone: "_DisconnectWatch") -> tuple[str, str]:
        while True:
            item = await gone.next(state.queue)
            if item[0] == "tokens":
                self._served(state, len(item[1]))
                stream.add(item[1])
            elif item[0] == "finish":
                stream.finish(item[2])
                self._finished(state, item[1])
                return stream.text, item[1]
            else:
                raise item[1]

    async def _sse(self, state: RequestState, stream: "_TextStream", body: _Common, first: tuple,
                   include_usage: bool, chat: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = self.model_name
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            payload = {"id": state.request_id, "object": obj, "created": created, "model": model,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return _sse_line(payload)

        finished = False
        try:
            if chat:
                yield chunk("", None, role=True)
            item = first
            while True:
                if item[0] == "tokens":
                    # one chunk per engine step, even when the text is held back (an incomplete UTF-8
                    # character, a possible stop string): clients time tokens by chunks
                    self._served(state, len(item[1]))
                    yield chunk(stream.add(item[1]), None)
                elif item[0] == "finish":
                    # text held back until now rides on the finishing chunk: no chunk without a token
                    tail = stream.finish(item[2])
                    finished = True
                    self._finished(state, item[1])
                    yield chunk(tail or (None if chat else ""), item[1])
                    if include_usage:
                        yield _sse_line({"id": state.request_id, "object": obj, "created": created,
                                         "model": model, "choices": [], "usage": _usage(state)})
                    yield b"data: [DONE]\n\n"
                    return
                else:
                    finished = True
                    yield _sse_line(item[1].body())
                    return
                item = await state.queue.get()
        finally:
            if not finished:  # the client went away (the generator was closed or cancelled)
                self.abort(state)

    def _full_body(self, state: RequestState, body: _Common, text: str, reason: str, chat: bool) -> dict:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {"id": state.request_id, "object": obj, "created": int(time.time()), "model": self.model_name,
                "choices": [choice], "usage": _usage(state)}


class ModeBusy(RuntimeError):
    """A mode change was asked for while another one runs."""


class ModeRolledBack(RuntimeError):
    """The new mode's workers failed their health check; the old mode is back."""


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _DisconnectWatch:
    """Waits for queue items while watching for the client's ``http.disconnect`` (non-streaming requests and
    the wait before a stream's first chunk; a running stream is watched by Starlette itself)."""

    def __init__(self, request: Request):
        self._receive = request.receive
        self._task: asyncio.Task | None = None
        self.error: Exception | None = None

    async def next(self, q: asyncio.Queue) -> tuple:
        """The next item of ``q``; _ClientGone if the client disconnects first."""
        if not q.empty():
            return q.get_nowait()
        get = asyncio.ensure_future(q.get())
        try:
            while True:
                if self._task is None:
                    self._task = asyncio.ensure_future(self._receive())
                done, _ = await asyncio.wait({get, self._task}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    return get.result()
                message = self._task.result()
                self._task = None
                if message.get("type") == "http.disconnect":
                    self.error = _ClientGone()
                    raise self.error
        finally:
            if not get.done():
                get.cancel()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 (OpenAI-style) before it is read in
    full or parsed: at once when Content-Length says so, else as soon as the bytes received pass the cap."""

    def __init__(self, app: Any, max_bytes: int, on_reject: Any):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    def _too_large(self) -> JSONResponse:
        self.on_reject()
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code="request_too_large").response()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        seen = 0

        async def capped_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)


class _BodyTooLarge(Exception):
    """A chunked body passed the cap while it was being read."""


class _ArrivalStamp:
    """ASGI middleware: stamps each HTTP request's arrival (wall-clock ns) before its body is read, so TTFT
    includes reading, parsing and validating the body, as the client sees it."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrival_ns"] = time.time_ns()
        await self.app(scope, receive, send)


def _block_size(handle: protocol.KVHandle | None) -> int:
    """Tokens per KV block of a worker (16, the engine's default, for workers without a handle)."""
    return int(handle.shape[3]) if handle is not None else 16


def _arrival_ns(request: Request) -> int:
    return getattr(request.state, "arrival_ns", None) or time.time_ns()


def _usage(state: RequestState) -> dict[str, Any]:
    return {"prompt_tokens": state.prompt_tokens, "completion_tokens": state.output_tokens,
            "total_tokens": state.prompt_tokens + state.output_tokens,
            "prompt_tokens_details": {"cached_tokens": state.cached_tokens}}


def _sse_line(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _TextStream:
    """Streamed text of one request: incremental detokenization, holding back what may be a stop string.

    The engine stops on a stop string and sends its final text with the stop string removed; until then
    the stream must not emit a tail that may turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._ids: list[int] = []
        self._stop = stop
        self.text = ""  # what has been sent

    def add(self, ids: list[int]) -> str:
        """New ids; returns the text now safe to send."""
        self._ids.extend(ids)
        full = self._detok.add(self._ids)
        safe = full
        for s in self._stop:
            at = safe.find(s)
            if at >= 0:
                safe = safe[:at]
        for s in self._stop:
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[: len(safe) - k]
                    break
        if len(safe) <= len(self.text) or not safe.startswith(self.text):
            return ""
        delta, self.text = safe[len(self.text):], safe
        return delta

    def finish(self, final_text: str | None) -> str:
        """The request finished; ``final_text`` is the engine's. Returns the last piece to send."""
        if final_text is None:
            final_text = self._detok.flush(self._ids)
        if not final_text.startswith(self.text):
            log.warning("streamed text is not a prefix of the engine's final text; sending only the tail")
            return ""
        delta, self.text = final_text[len(self.text):], final_text
        return delta
