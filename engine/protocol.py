"""The wire protocol between the API front-end and its engine worker processes.

One worker process runs one engine core (``LLMEngine``). The front-end talks to each worker over two
``multiprocessing`` queues: *requests* (front-end -> worker) and *events* (worker -> front-end). Every
message is a small picklable dataclass below; nothing else crosses the boundary (no engine objects, no
tensors), so a worker can live in another process today and behind a socket later.

Split-pool mode (issue 6): every worker announces its :class:`~phaselens.phase.Role` and its KV cache's
handle in :class:`WorkerReady`; a request carries the role it is sent for. The hand-off of a request sent
as ``Role.PREFILL``::

    prefill worker: StepReport (first token) -> KVReady(handoff)
    front-end:      picks a decode worker -> ContinueRequest(handoff, source handle)
    decode worker:  copies the missing blocks -> KVTransferred (or TransferFailed); then TokenDeltas
    front-end:      ReleaseKV -> prefill worker frees the blocks

A mode change sends :class:`SetRole` to each worker, which answers :class:`RoleSet` (its health check).
The front-end dispatches events by type, so adding kinds does not change the existing ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phaselens.engine.sampling_params import SamplingParams
from phaselens.phase import Role

# -- split mode: what a hand-off carries (no tensors: a cache is opened by its handle, kv_transfer.py)


@dataclass(frozen=True)
class KVHandle:
    """How a peer process opens one worker's KV cache (picklable, a few hundred bytes)."""

    worker_id: str
    kind: str  # "shm" (CPU) or "cuda_ipc"
    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"
    device: str
    shm_name: str | None = None
    #: ``reduce_tensor``'s (rebuild function, args) for CUDA IPC
    ipc: Any = None

    #: bytes of one element of ``dtype``
    itemsize: int = 4

    @property
    def num_blocks(self) -> int:
        return int(self.shape[2])  # layout (layers, 2, blocks, block_size, kv_heads, head_dim)

    @property
    def block_bytes(self) -> int:
        per_block = self.itemsize
        for i, n in enumerate(self.shape):
            if i != 2:
                per_block *= n
        return per_block


@dataclass(frozen=True)
class Handoff:
    """A parked request, as a decode worker needs it to continue."""

    request_id: str
    #: prompt and the first output token (whose KV is not computed yet)
    token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    params: SamplingParams
    arrival_ns: int
    #: the holding engine's block table, covering the ``num_prompt_tokens`` cached tokens
    block_ids: list[int]


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
class ContinueRequest:
    """Continue a request parked on ``source`` (its worker's KV handle; None: parked on this worker)."""

    handoff: Handoff
    source: KVHandle | None = None


@dataclass(frozen=True)
class ReleaseKV:
    """The request parked here was continued elsewhere: free its blocks."""

    request_id: str


@dataclass(frozen=True)
class SetRole:
    """Take this role (tags its steps); ``peers`` are the prefill workers' KV handles a decode worker must
    be able to open. Answered with :class:`RoleSet` carrying ``token``."""

    role: Role
    token: int
    peers: tuple[KVHandle, ...] = ()


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
    kv_handle: KVHandle | None = None


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


@dataclass(frozen=True)
class KVReady:
    """A request sent as ``Role.PREFILL`` has its first token; its blocks are parked for a decode worker."""

    worker_id: str
    handoff: Handoff


@dataclass(frozen=True)
class KVTransferred:
    """A worker took over a request parked on ``source_worker`` and copied what it lacked."""

    worker_id: str
    request_id: str
    source_worker: str
    blocks_moved: int
    blocks_cached: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class TransferFailed:
    """A worker could not take over a parked request; ``message`` says why."""

    worker_id: str
    request_id: str
    source_worker: str | None
    message: str


@dataclass(frozen=True)
class RoleSet:
    """Answer to :class:`SetRole`: ``ok`` False with ``message`` when the worker cannot take the role."""

    worker_id: str
    role: Role
    token: int
    ok: bool = True
    message: str = ""


#: what the front-end may send
Command = AddRequest | AbortRequest | ContinueRequest | ReleaseKV | SetRole | Shutdown
#: what a worker may send
Event = (WorkerReady | WorkerFailed | StepReport | StatsReport | RequestRejected | KVReady | KVTransferred
         | TransferFailed | RoleSet)
