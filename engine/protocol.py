"""The wire protocol between the API front-end and its engine worker processes.

One worker process runs one engine core (``LLMEngine``). The front-end talks to each worker over two
``multiprocessing`` queues: *requests* (front-end -> worker) and *events* (worker -> front-end). Every
message is a small picklable dataclass below; nothing else crosses the boundary (no engine objects, no
tensors), so a worker can live in another process today and behind a socket later.

Shaped for split-pool mode (issue 6): every worker announces its :class:`~phaselens.phase.Role` in
:class:`WorkerReady`; a request carries the role it is sent for, and the prefill -> decode hand-off will be
two more message kinds (a prefill worker's ``KVReady`` event, a decode worker's ``ContinueRequest``) that
reuse :class:`TokenDelta` for what follows. The front-end dispatches events by type, so adding kinds does
not change the existing ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phaselens.engine.sampling_params import SamplingParams
from phaselens.phase import Role

# -- front-end -> worker


@dataclass(frozen=True)
class AddRequest:
    """Start a request: the prompt is already tokenized and validated by the front-end."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    #: wall-clock ns at which the front-end received the HTTP request
    arrival_ns: int
    role: Role = Role.COLOCATED


@dataclass(frozen=True)
class AbortRequest:
    """Stop a request and free its KV blocks (its client went away, or the front-end gave up on it)."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more; exit the worker loop and close the engine."""


# -- worker -> front-end


@dataclass(frozen=True)
class WorkerReady:
    """First event of a worker: its engine is built and it accepts requests."""

    worker_id: str
    role: Role
    pid: int
    model_name: str
    max_model_len: int
    device: str
    vocab_size: int = 0
    gpu_uuid: str | None = None


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start or its loop crashed; ``message`` says why. The process exits after it."""

    worker_id: str
    message: str


@dataclass(frozen=True)
class TokenDelta:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    num_output_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    #: the engine's final text (stop string removed), only on the finishing delta
    text: str | None = None


@dataclass(frozen=True)
class RequestRejected:
    """The engine refused a request at ``add_request`` (``ValueError``: it names the problem)."""

    request_id: str
    message: str


@dataclass(frozen=True)
class StepReport:
    """The outputs of one engine step, with the step's phase and duration and the engine's counters after it.

    ``phase`` is the :class:`~phaselens.phase.Phase` value the scheduler gave the step (``None`` when the
    engine's stats did not say), ``stats`` the engine's ``EngineStats`` as a plain dict.
    """

    worker_id: str
    outputs: list[TokenDelta]
    t0_ns: int
    t1_ns: int
    phase: str | None = None
    step_seconds: float | None = None
    prefill_tokens: int = 0
    decode_tokens: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatsReport:
    """The engine's counters while idle (sent at most every ``heartbeat_s``), so gauges never go stale."""

    worker_id: str
    stats: dict[str, Any] = field(default_factory=dict)


#: what the front-end may send
Command = AddRequest | AbortRequest | Shutdown
#: what a worker may send
Event = WorkerReady | WorkerFailed | StepReport | StatsReport | RequestRejected
