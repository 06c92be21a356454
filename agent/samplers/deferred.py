"""A sampler whose vendor library cannot start yet: the agent stays up, says so, and retries.

A DaemonSet pod can start before the NVIDIA driver is loaded, or on a node whose GPU is gone. Exiting would
leave nothing to scrape and the node dark; the agent instead keeps serving ``/metrics`` and ``/health`` with
the sampler marked failed (``phaselens_sampler_success 0``, the error in ``/health``) and retries the start
every ``retry_s`` seconds. A start-up *configuration* error (a source this hardware cannot have, say GPM on
an Ampere card) stays a usage error: retrying cannot fix it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from phaselens.trace import SampleRecord

log = logging.getLogger(__name__)


class DeferredSampler:
    """Wraps ``factory()``: until it succeeds, :meth:`sample` returns nothing and ``last_error`` says why."""

    def __init__(self, name: str, factory: Callable[[], Any], first_error: str, retry_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._factory = factory
        self._retry_s = retry_s
        self._clock = clock
        self._next_try = clock() + retry_s
        self.inner: Any = None
        self.last_error = f"cannot start: {first_error}"
        log.error("%s sampler cannot start (%s); the agent goes on and retries every %.0f s",
                  name, first_error, retry_s)

    @property
    def gpus(self) -> list[Any]:
        return list(getattr(self.inner, "gpus", []))

    @property
    def failed(self) -> list[Any]:
        return list(getattr(self.inner, "failed", []))

    def sample(self) -> list[SampleRecord]:
        if self.inner is None:
            now = self._clock()
            if now < self._next_try:
                return []
            self._next_try = now + self._retry_s
            try:
                self.inner = self._factory()
            except Exception as exc:  # noqa: BLE001 - NVMLError is no OSError; any start failure is retried
                self.last_error = f"cannot start: {type(exc).__name__}: {exc}"
                return []
            log.warning("%s sampler started after an earlier failure", self.name)
            self.last_error = ""
        got: list[SampleRecord] = self.inner.sample()
        self.last_error = getattr(self.inner, "last_error", "")
        return got

    def next_due_ns(self, now: int, interval_ns: int) -> int:
        next_due = getattr(self.inner, "next_due_ns", None)
        return next_due(now, interval_ns) if next_due else now + interval_ns

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
