"""Prometheus exporter: a custom collector over the agent's state (DESIGN.md, "Prometheus names").

The daemon registers ``AgentCollector(state)`` on its own ``CollectorRegistry`` and serves ``/metrics``.
Every scrape reads one consistent :meth:`AgentState.snapshot` and turns it into metric families whose
names, types, help texts and label sets come from :mod:`phaselens.exporters.catalogue`.

A scrape always answers: during start-up, with no GPU, or with a failed sampler the per-GPU families are
empty or partial and the health metrics (``phaselens_agent_started``, ``phaselens_agent_gpus``,
``phaselens_sampler_success``, ``phaselens_agent_samplers_failed``) say why. If reading the state itself
fails, the failure is logged and counted in ``phaselens_agent_collect_errors_total`` and the scrape still
answers with the health metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from phaselens import __version__
from phaselens.agent.state import AgentSnapshot, AgentState, GpuIdentity
from phaselens.exporters.catalogue import METRICS, MetricSpec, by_producer, metric
from phaselens.phase import Phase
from phaselens.trace import UTILIZATION_KEYS

log = logging.getLogger(__name__)

# Raw (latest) non-ratio sample keys -> the gauge that exports them.
_RAW_GAUGES = {
    "power_w": "phaselens_gpu_power_watts",
    "sm_clock_hz": "phaselens_gpu_sm_clock_hertz",
    "mem_used_bytes": "phaselens_gpu_memory_used_bytes",
}


def _family(spec: MetricSpec) -> Any:
    """An empty metric family for ``spec`` with the catalogue's name, help, unit and labels."""
    labels = list(spec.labels)
    if spec.type == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
    if spec.type == "counter":
        return CounterMetricFamily(spec.base_name, spec.help, labels=labels, unit=spec.unit)
    return HistogramMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)


def gpu_label_values(gpu: GpuIdentity, hostname: str) -> list[str]:
    """Values of catalogue.GPU_LABELS for one GPU, in order."""
    return [hostname, str(gpu.index) if gpu.index >= 0 else "", gpu.uuid, gpu.model_name, gpu.role, gpu.pod,
            gpu.namespace, gpu.container, gpu.source]


class AgentCollector(Collector):
    """prometheus_client custom collector over an :class:`AgentState` (one snapshot per scrape)."""

    def __init__(self, state: AgentState, rejection_reasons: Iterable[str] = ()):
        """``rejection_reasons``: every reason the phase receiver can count (agent/receiver.py REASONS);
        each is exported from the start at 0, so ``rate()`` of a reason that has not happened yet is 0
        rather than no data (Prometheus' advice: initialise the label values you know)."""
        self.state = state
        self.rejection_reasons = tuple(rejection_reasons)
        self._errors = 0
        self._errors_lock = threading.Lock()

    def describe(self) -> list[Any]:
        """The families this collector produces (lets the registry check for duplicate names up front)."""
        return [_family(spec) for spec in by_producer("agent")]

    def collect(self) -> Iterator[Metric]:
        families = {spec.name: _family(spec) for spec in by_producer("agent")}
        hostname = self.state.hostname
        try:
            snap = self.state.snapshot()
            self._fill(snap, families)
        except Exception:  # noqa: BLE001 - a scrape must answer; the error is logged and counted
            log.exception("reading the agent state for a scrape failed")
            with self._errors_lock:
                self._errors += 1
            # Health only: drop whatever was half-filled.
            families = {spec.name: _family(spec) for spec in by_producer("agent")}
            families["phaselens_agent_started"].add_metric([hostname], 0.0)
        families["phaselens_agent_info"].add_metric([hostname, __version__], 1.0)
        with self._errors_lock:
            errors = self._errors
        families["phaselens_agent_collect_errors_total"].add_metric([hostname], float(errors))
        # Emit in catalogue order so the exposition is stable.
        for spec in METRICS:
            if spec.name in families:
                yield families[spec.name]

    # -- snapshot -> families

    def _fill(self, snap: AgentSnapshot, fam: dict[str, Any]) -> None:
        host = snap.hostname

        def ident(uuid: str) -> GpuIdentity:
            if uuid in snap.gpus:
                return snap.gpus[uuid]
            if uuid in snap.attribution:
                return snap.attribution[uuid].gpu
            return GpuIdentity(uuid=uuid, index=-1, name="")

        fam["phaselens_agent_started"].add_metric([host], 1.0 if snap.started else 0.0)
        fam["phaselens_agent_gpus"].add_metric([host], float(len(snap.gpus)))
        failed = 0
        for name, health in sorted(snap.samplers.items()):
            fam["phaselens_sampler_success"].add_metric([host, name], 1.0 if health.success else 0.0)
            fam["phaselens_sampler_duration_seconds"].add_metric([host, name], health.duration_s)
            failed += 0 if health.success else 1
            fam["phaselens_sampler_errors_total"].add_metric([host, name],
                                                             float(snap.sampler_errors.get(name, 0)))
        fam["phaselens_agent_samplers_failed"].add_metric([host], float(failed))
        fam["phaselens_agent_recorder_failed"].add_metric([host], 1.0 if snap.recorder_error else 0.0)
        fam["phaselens_shim_events_received_total"].add_metric([host], float(snap.shim_received))
        rejected = {reason: 0 for reason in self.rejection_reasons} | snap.shim_rejected
        for reason, n in sorted(rejected.items()):
            fam["phaselens_shim_events_rejected_total"].add_metric([host, reason], float(n))

        for uuid, att in sorted(snap.attribution.items()):
            g = gpu_label_values(ident(uuid), host)
            for phase, pv in sorted(att.phases.items(), key=lambda kv: kv[0].value):
                for key, value in sorted(pv.values.items()):
                    fam["phaselens_phase_utilization_ratio"].add_metric(g + [phase.value, key], value)
                for key, value in sorted(pv.uncertainty.items()):
                    fam["phaselens_phase_utilization_uncertainty_ratio"].add_metric(
                        g + [phase.value, key], value)
                if pv.mfu is not None:
                    fam["phaselens_phase_mfu_ratio"].add_metric(g + [phase.value], pv.mfu)
                if pv.mbu is not None:
                    fam["phaselens_phase_mbu_ratio"].add_metric(g + [phase.value], pv.mbu)
            for phase, share in sorted(att.time_share.items(), key=lambda kv: kv[0].value):
                fam["phaselens_phase_time_ratio"].add_metric(g + [phase.value], share)
            for key, value in sorted(att.blended.items()):
                if key in UTILIZATION_KEYS:
                    fam["phaselens_gpu_utilization_ratio"].add_metric(g + [key], value)
            if att.alignment_offset_s is not None:
                fam["phaselens_attribution_offset_seconds"].add_metric(g, att.alignment_offset_s)
            fam["phaselens_attribution_windows"].add_metric(g, float(att.windows))
            if att.updated_ns:
                fam["phaselens_attribution_age_seconds"].add_metric(
                    g, max(0.0, (snap.taken_ns - att.updated_ns) / 1e9))

        for uuid, raw in sorted(snap.raw.items()):
            g = gpu_label_values(ident(uuid), host)
            for key, name in _RAW_GAUGES.items():
                if key in raw:
                    fam[name].add_metric(g, raw[key])

        for (uuid, phase), seconds in sorted(snap.busy_seconds.items(), key=_key):
            fam["phaselens_phase_busy_seconds_total"].add_metric(gpu_label_values(ident(uuid), host)
                                                                 + [phase.value], seconds)
        for (uuid, phase, kind), n in sorted(snap.tokens.items(), key=_key):
            fam["phaselens_phase_tokens_total"].add_metric(gpu_label_values(ident(uuid), host)
                                                           + [phase.value, kind], float(n))
        for (uuid, phase), hist in sorted(snap.step_durations.items(), key=_key):
            # state.Histogram counts are already cumulative (observe() bumps every bound >= value).
            buckets = [(_le(b), float(c)) for b, c in zip(hist.bounds, hist.counts)]
            buckets.append(("+Inf", float(hist.count)))
            fam["phaselens_step_duration_seconds"].add_metric(gpu_label_values(ident(uuid), host)
                                                              + [phase.value], buckets, hist.total)


def _key(item: tuple[tuple[Any, ...], Any]) -> tuple[str, ...]:
    return tuple(k.value if isinstance(k, Phase) else str(k) for k in item[0])


def _le(bound: float) -> str:
    # prometheus_client's own formatting of bucket bounds ("0.005", "1.0"), so series match the engine's.
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def agent_registry(state: AgentState, rejection_reasons: Iterable[str] = ()) -> CollectorRegistry:
    """A fresh registry holding only the agent collector (what the daemon serves on /metrics)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(AgentCollector(state, rejection_reasons))
    return registry


__all__ = ["AgentCollector", "agent_registry", "gpu_label_values", "metric"]
