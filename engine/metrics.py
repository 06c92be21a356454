"""The engine's own Prometheus metrics (``phaselens_engine_*``), built from the metric catalogue.

The front-end measures request latencies where the client sees them (TTFT, inter-token latency, time per
output token, end-to-end), and republishes the workers' engine counters (queue, running requests, KV
usage, prefix hits, tokens and step time by phase) from their step reports. Histograms use the
OpenTelemetry GenAI bucket boundaries (``catalogue.GENAI_*``).

Names, types, labels and buckets come from ``exporters/catalogue.py`` (``catalogue.by_producer("engine")``),
the one list of names; nothing here repeats them.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from phaselens.exporters import catalogue


class EngineMetrics:
    """The front-end's ``phaselens_engine_*`` metrics on their own registry (thread-safe)."""

    def __init__(self, model_name: str, hostname: str | None = None,
                 registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.hostname = hostname or socket.gethostname()
        self.model_name = model_name
        self._lock = threading.Lock()
        #: worker id -> last cumulative counters seen (prefix hits/queries, preemptions)
        self._last: dict[str, dict[str, float]] = {}
        self.kv_usage = self._make("phaselens_engine_kv_cache_usage_ratio")
        self.ttft = self._make("phaselens_engine_time_to_first_token_seconds")
        self.itl = self._make("phaselens_engine_inter_token_latency_seconds")
        self.tpot = self._make("phaselens_engine_time_per_output_token_seconds")
        self.e2e = self._make("phaselens_engine_request_duration_seconds")
        self.requests = self._make("phaselens_engine_requests_total")
        self.rejected = self._make("phaselens_engine_requests_rejected_total")
        self.waiting = self._make("phaselens_engine_requests_waiting")
        self.running = self._make("phaselens_engine_requests_running")
        self.prefix_ratio = self._make("phaselens_engine_prefix_cache_hit_ratio")
        self.prefix_hits = self._make("phaselens_engine_prefix_cache_hit_tokens_total")
        self.prefix_queries = self._make("phaselens_engine_prefix_cache_query_tokens_total")
        self.preemptions = self._make("phaselens_engine_preemptions_total")
        self.tokens = self._make("phaselens_engine_tokens_total")
        self.step_duration = self._make("phaselens_engine_step_duration_seconds")
        self.workers_alive = self._make("phaselens_engine_workers_alive")
        self.kv_transfer = self._make("phaselens_engine_kv_transfer_seconds")
        self.kv_transfer_bytes = self._make("phaselens_engine_kv_transfer_bytes_total")
        self.shim_sent = self._make("phaselens_engine_shim_records_sent_total")
        self.shim_dropped = self._make("phaselens_engine_shim_records_dropped_total")

    def _make(self, name: str) -> Any:
        return catalogue.create(catalogue.metric(name), self.registry)

    def _base(self, role: str) -> dict[str, str]:
        return {"hostname": self.hostname, "model_name": self.model_name, "role": role}

    # -- request latencies (measured by the front-end)

    def observe_first_token(self, role: str, ttft_s: float) -> None:
        self.ttft.labels(**self._base(role)).observe(ttft_s)

    def observe_inter_token(self, role: str, gap_s: float) -> None:
        self.itl.labels(**self._base(role)).observe(gap_s)

    def observe_finished(self, role: str, status: str, e2e_s: float | None, tpot_s: float | None) -> None:
        base = self._base(role)
        self.requests.labels(**base, status=status).inc()
        if status == "ok" and e2e_s is not None:
            self.e2e.labels(**base).observe(e2e_s)
            if tpot_s is not None:
                self.tpot.labels(**base).observe(tpot_s)

    def count_rejected(self, role: str, reason: str) -> None:
        self.rejected.labels(**self._base(role), reason=reason).inc()

    def observe_kv_transfer(self, role: str, seconds: float, nbytes: int) -> None:
        """One request's KV hand-off, as its receiving worker timed it."""
        base = self._base(role)
        self.kv_transfer.labels(**base).observe(seconds)
        self.kv_transfer_bytes.labels(**base).inc(nbytes)

    def set_workers_alive(self, role: str, n: int) -> None:
        self.workers_alive.labels(**self._base(role)).set(n)

    # -- engine counters (from the workers' reports)

    def observe_step(self, worker: str, role: str, phase: str | None, seconds: float | None,
                     prefill_tokens: int, decode_tokens: int) -> None:
        labels = {**self._base(role), "worker": worker}
        if phase is None:
            return
        if seconds is not None:
            self.step_duration.labels(**labels, phase=phase).observe(seconds)
        if prefill_tokens:
            self.tokens.labels(**labels, phase=phase, kind="prefill").inc(prefill_tokens)
        if decode_tokens:
            self.tokens.labels(**labels, phase=phase, kind="decode").inc(decode_tokens)

    def update_engine_stats(self, worker: str, role: str, stats: dict[str, Any]) -> None:
        """Republish one worker's ``EngineStats`` (a dict from ``worker_process.stats_dict``)."""
        if not stats:
            return
        labels = {**self._base(role), "worker": worker}
        self.waiting.labels(**labels).set(stats.get("num_waiting", 0))
        self.running.labels(**labels).set(stats.get("num_running", 0))
        self.kv_usage.labels(**labels).set(stats.get("kv_usage", 0.0))
        hits = float(stats.get("prefix_hit_tokens", 0) or 0)
        queries = float(stats.get("prefix_query_tokens", 0) or 0)
        if queries > 0:
            self.prefix_ratio.labels(**labels).set(hits / queries)
        with self._lock:
            last = self._last.setdefault(worker, {"hits": 0.0, "queries": 0.0, "preemptions": 0.0,
                                                  "shim_sent": 0.0, "shim_dropped": 0.0})
            now = {"hits": hits, "queries": queries,
                   "preemptions": float(stats.get("num_preemptions", 0) or 0),
                   "shim_sent": float(stats.get("shim_sent", 0) or 0),
                   "shim_dropped": float(stats.get("shim_dropped", 0) or 0)}
            # counters only move forward: the engine's totals are cumulative since it started
            delta = {key: now[key] - last[key] for key in now}
            last.update({key: max(now[key], last[key]) for key in now})
        # .labels() creates each series at 0, so a worker that never preempted still exports the counter
        for counter, d in ((self.prefix_hits, delta["hits"]), (self.prefix_queries, delta["queries"]),
                           (self.preemptions, delta["preemptions"]), (self.shim_sent, delta["shim_sent"]),
                           (self.shim_dropped, delta["shim_dropped"])):
            child = counter.labels(**labels)
            if d > 0:
                child.inc(d)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
