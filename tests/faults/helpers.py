"""Shared by the fault-injection tests: read the agent's own exposition, wait on a condition."""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from phaselens.agent.receiver import REASONS
from phaselens.agent.state import AgentState
from phaselens.exporters.prometheus import agent_registry


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from Prometheus text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(state: AgentState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a Prometheus scrape of this agent reads (the daemon's own registry)."""
    return parse_exposition(generate_latest(agent_registry(state, REASONS)).decode())


def value(metrics: dict, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``; KeyError naming it if there is none."""
    hits = [v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= set(ls)]
    if len(hits) != 1:
        raise KeyError(f"{name}{labels}: {len(hits)} samples")
    return hits[0]


def wait_for(condition: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until truthy; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
