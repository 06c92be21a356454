"""What every sampler shares: the GPU list it reads, its health, and "log an unsupported field once".

A sampler has one method, :meth:`Sampler.sample`, returning trace :class:`SampleRecord`s. Collecting is
lenient: a field the hardware does not support is logged once and skipped from then on; a GPU that
disappears (NVML ``GPU_IS_LOST`` and the like) is marked failed and the others go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from phaselens.trace import SampleRecord

log = logging.getLogger(__name__)


@dataclass
class SampledGpu:
    """One GPU a sampler reads: UUID, name, and NVML index at the agent (not the engine's index:
    CUDA_VISIBLE_DEVICES renumbers those)."""

    uuid: str
    index: int
    name: str
    handle: object = None
    failed: bool = False
    last_error: str = ""
    #: fields found unsupported on this GPU (logged once, then skipped)
    unsupported: set[str] = field(default_factory=set)


class Sampler(Protocol):
    """One source of GPU samples."""

    name: str

    def sample(self) -> list[SampleRecord]:
        """Read every GPU once; never raises for a lost GPU or an unsupported field."""
        ...


class FieldSkipper:
    """Remembers unsupported fields per GPU and logs each once."""

    def __init__(self, sampler: str):
        self.sampler = sampler

    def skip(self, gpu: SampledGpu, key: str, why: str) -> bool:
        """Mark ``key`` unsupported on ``gpu``; True the first time (the sampler reports that poll failed, so
        the loss of a field shows in the health metrics once, not only in the log)."""
        if key in gpu.unsupported:
            return False
        gpu.unsupported.add(key)
        log.warning("%s sampler: %s on %s (%s) is not available: %s; skipping it from now on",
                    self.sampler, key, gpu.uuid, gpu.name, why)
        return True


class Throttled:
    """Log a recurring warning once, then at most once a minute per key (polls can fail 100 times a s)."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) >= self.interval_s:
            self._last[key] = now
            log.warning(msg + " (%d times so far)", *args, self._count[key])


def mark_lost(sampler: str, gpu: SampledGpu, why: str) -> None:
    """Mark a GPU failed (logged once); the sampler keeps reading the others."""
    if not gpu.failed:
        log.error("%s sampler: lost GPU %s (%s): %s; going on without it", sampler, gpu.uuid, gpu.name, why)
    gpu.failed = True
    gpu.last_error = why


def select_gpus(found: list[SampledGpu], uuids: list[str] | None, sampler: str) -> list[SampledGpu]:
    """Keep the GPUs named by UUID (any order; indices differ between processes), or all when None.

    ValueError names a UUID that is not on this node: strict at start-up.
    """
    if not uuids:
        return found
    by_uuid = {g.uuid: g for g in found}
    missing = [u for u in uuids if u not in by_uuid]
    if missing:
        have = ", ".join(by_uuid) or "none"
        raise ValueError(f"{sampler} sampler: GPU {missing[0]!r} not found on this node (have: {have})")
    return [by_uuid[u] for u in uuids]
