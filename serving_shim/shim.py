"""The phase shim: what the engine calls around every step (docs/contracts.md, "Phase shim").

One :class:`PhaseShim` per engine worker. Around each model step the engine calls::

    shim.step_begin()
    ...run the step...
    shim.step_end(phase, prefill_seqs=[(chunk_len, cached_ctx_before), ...], decode_ctx=[ctx_before, ...])

and, once the step's outputs are on the host, ``shim.poll()``. The shim times the step (:mod:`.timer`),
costs it (:mod:`.cost`) and, once its interval is known, emits one ``step`` record (:mod:`.emitter`). No call
blocks on the GPU or on the agent. ``enabled=False`` turns every call into a no-op: the A/B baseline for
``bench/shim_overhead.py``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from phaselens.engine.config import ModelConfig
from phaselens.gpus import find_gpu_spec
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.cost import PrefillChunk, StepFigures, step_figures
from phaselens.serving_shim.device import gpu_uuid_for
from phaselens.serving_shim.emitter import DEFAULT_SOCKET_PATH, RECONNECT_INTERVAL_S, PhaseEmitter
from phaselens.serving_shim.step_line import StepLine, step_head
from phaselens.serving_shim.timer import DEFAULT_CAPACITY, StepTimer
from phaselens.trace import GpuInfo, MetaRecord

__all__ = ["DEFAULT_SOCKET_PATH", "PhaseShim", "ShimStats"]

#: How often the JSONL file is flushed while the engine runs.
FLUSH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ShimStats:
    """Counters of one shim: records ``sent`` to the agent, ``dropped`` (no agent, a full queue and backlog, a
    file error, or a full ring of unresolved steps), ``pending`` (steps not yet resolved plus records parked
    for a full agent queue), lines ``written`` to the JSONL file."""

    sent: int = 0
    dropped: int = 0
    pending: int = 0
    written: int = 0


#: what the timer keeps of a step until its interval is known: (step number, phase, figures)
_StepInfo = tuple[int, Phase, StepFigures]


def _check_phase(phase: Phase, prefill_tokens: int, decode_tokens: int) -> None:
    has_prefill, has_decode = prefill_tokens > 0, decode_tokens > 0
    expected = (Phase.MIXED if has_prefill and has_decode else Phase.PREFILL if has_prefill
                else Phase.DECODE if has_decode else None)
    if expected is None:
        raise ValueError("step_end() with no prefill chunk and no decode: an empty step is not a step")
    if phase is not expected:
        raise ValueError(f"step_end(phase={phase.value!r}) but the step carries "
                         f"{prefill_tokens} prefill and {decode_tokens} decode tokens "
                         f"(that is {expected.value!r})")


class PhaseShim:
    """Times, costs and emits every engine step; see the module docstring for the calling sequence.

    ``gpu_uuid`` defaults to :func:`~phaselens.serving_shim.device.gpu_uuid_for` of ``device``;
    ``dtype_bytes`` is the element size of the weights and the KV cache (2 for bf16, 4 for float32);
    ``socket_path=None`` sends nothing (JSONL only). Records say clock ``gpu`` on CUDA, ``host`` elsewhere.
    ``capacity`` bounds the steps awaiting resolution; ``reconnect_interval_s`` is how long records are
    dropped unsent after the agent was found missing (:mod:`.emitter`).
    """

    def __init__(self, model_config: ModelConfig, gpu_uuid: str | None = None, engine_id: str = "e0",
                 role: Role = Role.COLOCATED, device: torch.device | str = "cpu", dtype_bytes: int = 4,
                 socket_path: str | os.PathLike[str] | None = DEFAULT_SOCKET_PATH,
                 jsonl_path: str | os.PathLike[str] | None = None, enabled: bool = True,
                 capacity: int = DEFAULT_CAPACITY, reconnect_interval_s: float = RECONNECT_INTERVAL_S):
        if dtype_bytes <= 0:
            raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes}")
        self.model_config = model_config
        self.device = torch.device(device)
        self.engine_id = engine_id
        self.role = Role.parse(role) if isinstance(role, str) else role
        self.dtype_bytes = dtype_bytes
        self.enabled = enabled
        self.steps = 0
        self._timer: StepTimer[_StepInfo] | None = None
        self._emitter: PhaseEmitter | None = None
        self.gpu_uuid = gpu_uuid or ""
        self.clock = Clock.GPU if self.device.type == "cuda" else Clock.HOST
        self._closed_stats = ShimStats()
        self._last_flush = time.monotonic()
        self._head_key: tuple[str, str, Role] | None = None
        self._head = ""
        if not enabled:
            return
        self.gpu_uuid = gpu_uuid or gpu_uuid_for(self.device)
        self._timer = StepTimer(self.device, capacity=capacity)
        self._emitter = PhaseEmitter(socket_path, jsonl_path, reconnect_interval_s=reconnect_interval_s)
        self._emitter.write_meta(self._meta())

    # ------------------------------------------------------------------ the engine's calls

    def step_begin(self) -> None:
        """Mark the start of a step: a CUDA event on the current stream (the host clock on CPU)."""
        if self._timer is not None:
            self._timer.begin()

    def step_end(self, phase: Phase, prefill_seqs: Sequence[PrefillChunk] = (),
                 decode_ctx: Sequence[int] = ()) -> None:
        """Mark the end of the step begun last and say what it carried.

        ``prefill_seqs``: ``(chunk_len, cached_ctx_before)`` per prefill chunk (optionally a third element,
        False for a chunk that does not finish its prompt and so samples no token); ``decode_ctx``: tokens
        already cached for each decoding sequence. ValueError if ``phase`` contradicts them.
        Emits every step already finished on the GPU (the host clock: this one).
        """
        timer = self._timer
        if timer is None:
            return
        figures = step_figures(self.model_config, prefill_seqs, decode_ctx, self.dtype_bytes)
        _check_phase(phase, figures[0], figures[1])
        timer.end((self.steps, phase, figures))
        self.steps += 1
        self.poll()

    def poll(self) -> int:
        """Emit every step whose interval has resolved (``event.query()``; never synchronizes); how many."""
        timer, emitter = self._timer, self._emitter
        if timer is None or emitter is None:
            return 0
        done = timer.poll()
        emitter.retry()
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_INTERVAL_S:  # a tailing reader sees the JSONL within a second
            self._last_flush = now
            emitter.flush()
        if done:
            uuid, engine, role, clock = self.gpu_uuid, self.engine_id, self.role, timer.clock
            key = (uuid, engine, role)
            if key != self._head_key:  # the role changes with a split-mode switch
                self._head_key, self._head = key, step_head(uuid, engine, role)
            head = self._head
            for (step, phase, figures), t0, t1 in done:
                emitter.emit_lazy(StepLine(head, uuid, engine, role, phase, step, t0, t1, clock, figures))
        return len(done)

    def close(self, timeout_s: float = 2.0) -> None:
        """Emit what is left (waiting up to ``timeout_s`` for the GPU), then close the socket and file.

        Shutdown only: steps still unresolved at the deadline are dropped and counted.
        """
        timer, emitter = self._timer, self._emitter
        if timer is None or emitter is None:
            return
        deadline = time.monotonic() + timeout_s
        self.poll()
        while (timer.pending or emitter.backlog) and time.monotonic() < deadline:
            time.sleep(0.001)  # polling event.query() and the agent's queue with a deadline, never blocking
            self.poll()
        timer.discard_pending()
        emitter.flush()
        emitter.close()
        self._timer = None
        self._emitter = None
        self._closed_stats = self._stats(timer, emitter)

    @property
    def stats(self) -> ShimStats:
        """Counters so far (zeros when disabled)."""
        if self._timer is None or self._emitter is None:
            return self._closed_stats
        return self._stats(self._timer, self._emitter)

    def __enter__(self) -> "PhaseShim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _stats(timer: StepTimer[_StepInfo], emitter: PhaseEmitter) -> ShimStats:
        return ShimStats(sent=emitter.sent, dropped=emitter.dropped + timer.dropped,
                         pending=timer.pending + emitter.backlog, written=emitter.written)

    def _meta(self) -> MetaRecord:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            name = torch.cuda.get_device_name(index)
            spec = find_gpu_spec(name)
            info = GpuInfo(self.gpu_uuid, index, name, spec.peak_bf16_flops if spec else None,
                           spec.peak_dram_bytes_per_s if spec else None)
        else:
            info = GpuInfo(self.gpu_uuid, self.device.index or 0, "simulated (cpu)")
        return MetaRecord(host=socket.gethostname(), gpus=(info,))
