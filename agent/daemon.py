"""The node agent's loop: sample -> timeline -> attribute -> publish, plus its HTTP endpoints.

One :class:`AgentDaemon` per node. The phase receiver runs on its own thread and puts the shims' steps on the
timeline; the daemon's tick polls the samplers that are due, puts their samples on the same timeline, runs the
attribution every ``attribute_interval_s`` and publishes into :class:`AgentState`, which ``/metrics``
(phaselens.exporters.prometheus) and ``/health`` read.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from phaselens.agent.attribution import AttributionConfig, Attributor
from phaselens.agent.receiver import PhaseReceiver
from phaselens.agent.state import AgentState, GpuAttribution, GpuIdentity, SamplerHealth
from phaselens.agent.timeline import Timeline
from phaselens.gpus import GpuSpec, find_gpu_spec
from phaselens.trace import GpuInfo, MetaRecord, SampleRecord, TraceWriter

log = logging.getLogger(__name__)

SOURCES = ("gpm", "nvml", "dcgm", "simulated", "replay")


@dataclass
class AgentConfig:
    """Everything ``phaselens agent`` is configured with (flags / PHASELENS_* env vars)."""

    source: str = "gpm"
    socket_path: str = "/run/phaselens/phaselens.sock"
    poll_interval_ms: float = 10.0
    nvml_interval_ms: float = 1000.0
    #: once per scrape (deploy/base/podmonitor.yaml: 15 s): each pass costs ~20 ms of CPU over a 60-s horizon
    attribute_interval_s: float = 15.0
    horizon_s: float = 60.0
    method: str = "unmix"
    listen_address: str = "0.0.0.0"
    port: int = 9464
    gpus: list[str] = field(default_factory=list)
    dcgm_url: str = "http://localhost:9400/metrics"
    hostname: str = field(default_factory=socket.gethostname)
    simulated_gpus: int = 1
    replay_trace: str | None = None
    replay_speed: float = 1.0
    seed: int = 0


@dataclass
class _Scheduled:
    sampler: Any
    interval_ns: int
    next_ns: int = 0


class AgentDaemon:
    """Ties samplers, receiver, timeline and attributor together; :meth:`tick` is the architecture."""

    def __init__(self, config: AgentConfig, state: AgentState, timeline: Timeline,
                 samplers: list[tuple[Any, float]], gpus: list[GpuIdentity],
                 receiver: PhaseReceiver | None = None, clock: Callable[[], int] = time.time_ns):
        self.config, self.state, self.timeline, self.receiver = config, state, timeline, receiver
        #: set by :meth:`record_to`: every step received and every poll (stale ones included) is written
        self.recorder: TraceWriter | None = None
        self.clock = clock
        self.samplers = [_Scheduled(s, int(interval_ms * 1e6)) for s, interval_ms in samplers]
        self._reads_steps = any(getattr(s, "reads_steps", False) for s, _ in samplers)
        self.attributor = Attributor(AttributionConfig(method=config.method, horizon_s=config.horizon_s))
        self.gpus: dict[str, GpuIdentity] = {g.uuid: g for g in gpus}
        #: the ``source`` label of a GPU learned later (from a step): the agent's source
        self.source_label = config.source
        self.specs: dict[str, GpuSpec | None] = {}
        self._next_attr_ns = 0
        self._stop = threading.Event()
        self._recorder_lock = threading.Lock()
        state.set_gpus(list(self.gpus.values()))

    # ---------------------------------------------------------------- the tick

    def tick(self, now_ns: int | None = None) -> None:
        """One turn of the loop: sample -> timeline -> attribute -> publish."""
        now = self.clock() if now_ns is None else now_ns
        if self._reads_steps:
            self.flush_receiver()
        samples = self.sample(now)
        # polls that saw no refresh stay out of the timeline (the recorder keeps them); the attribution
        # looks at refreshes only
        self.timeline.add_samples(s for s in samples if any(v is not None for v in s.values.values()))
        if now >= self._next_attr_ns:
            self._next_attr_ns = now + int(self.config.attribute_interval_s * 1e9)
            self.flush_receiver()
            self.publish(self.attribute(now))

    def flush_receiver(self) -> None:
        """Put the records the shims have sent but the receiver has not handled yet (it handles them in
        batches, agent/receiver.py) on the timeline: before attributing, and before each poll of a sampler
        that reads the timeline (the simulated one), so neither misses a step."""
        if self.receiver is not None:
            self.receiver.flush()

    def sample(self, now: int) -> list[SampleRecord]:
        """Poll every sampler that is due; record each one's health; replayed steps go on the timeline."""
        out: list[SampleRecord] = []
        for sch in self.samplers:
            if now < sch.next_ns:
                continue
            sampler = sch.sampler
            t0 = time.perf_counter()
            try:
                got = sampler.sample()
                # a lost GPU stays named while a transient error of another GPU comes and goes
                error = "; ".join([e for e in [getattr(sampler, "last_error", "")] if e] + [
                    f"{g.uuid}: {g.last_error}" for g in getattr(sampler, "failed", [])])
            except Exception as exc:  # noqa: BLE001 - a sampler bug must not stop the agent; it is reported
                log.exception("sampler %s failed", sampler.name)
                got, error = [], f"{type(exc).__name__}: {exc}"
            self.state.sampler_result(SamplerHealth(sampler.name, not error, time.perf_counter() - t0, error))
            for lost in getattr(sampler, "failed", []):
                self.state.forget_raw(lost.uuid)
            next_due = getattr(sampler, "next_due_ns", None)
            sch.next_ns = next_due(now, sch.interval_ns) if next_due else now + sch.interval_ns
            for rec in got:
                self.state.update_raw(rec.gpu_uuid, rec.values)
                self._learn_gpu(rec.gpu_uuid)
                self._record(rec)
            out.extend(got)
            steps_due = getattr(sampler, "steps_due", None)
            if steps_due is not None:
                for step in steps_due():
                    self.timeline.add_step(step)
                    self.state.observe_step(step)
                    self._record(step)
        return out

    def attribute(self, now: int) -> list[GpuAttribution]:
        results = []
        for uuid in sorted(set(self.gpus) | set(self.timeline.gpus())):
            ident = self._learn_gpu(uuid)
            results.append(self.attributor.attribute(ident, self.timeline.steps(uuid),
                                                     self.timeline.samples(uuid), now_ns=now,
                                                     spec=self._spec(ident)))
        return results

    def publish(self, results: list[GpuAttribution]) -> None:
        for result in results:
            self.state.publish_attribution(result)

    # ---------------------------------------------------------------- helpers

    def _learn_gpu(self, uuid: str) -> GpuIdentity:
        ident = self.gpus.get(uuid)
        if ident is None:
            name = ""
            if self.receiver is not None and uuid in self.receiver.metas:
                meta = self.receiver.metas[uuid]
                name = next((g.name for g in meta.gpus if g.uuid == uuid), "")
            ident = self.gpus[uuid] = GpuIdentity(uuid=uuid, index=-1, name=name, source=self.source_label)
            self.state.set_gpus(list(self.gpus.values()))
        return ident

    def _spec(self, ident: GpuIdentity) -> GpuSpec | None:
        if ident.uuid not in self.specs:
            spec = find_gpu_spec(ident.name) if ident.name else None
            if spec is None:
                log.warning("GPU %s (%r): no peak figures known; MFU/MBU are not reported for it",
                            ident.uuid, ident.name)
            self.specs[ident.uuid] = spec
        return self.specs[ident.uuid]

    def record_to(self, writer: TraceWriter) -> None:
        """Write a trace from now on: a meta record naming the GPUs, then every step and every sample.

        Call before the receiver starts, so that no step arrives unrecorded."""
        gpus = []
        for g in self.gpus.values():
            spec = find_gpu_spec(g.name)
            gpus.append(GpuInfo(g.uuid, max(g.index, 0), g.name, spec.peak_bf16_flops if spec else None,
                                spec.peak_dram_bytes_per_s if spec else None))
        writer.write(MetaRecord(host=self.config.hostname, gpus=tuple(gpus)))
        self.recorder = writer
        if self.receiver is not None:
            self.receiver.on_step = self._record

    def _record(self, rec: Any) -> None:
        """Write one record to the trace, if recording. A write error (disk full, ...) stops the recording
        with a logged error and phaselens_agent_recorder_failed 1; sampling, attribution and the receiver
        go on (an exception here would end the loop or the receiving thread)."""
        writer = self.recorder
        if writer is None:
            return
        try:
            writer.write(rec)
        except (OSError, ValueError) as exc:  # ValueError: written after a close under us
            with self._recorder_lock:
                if self.recorder is not writer:
                    return  # the other thread stopped it already
                self.recorder = None
                if self.receiver is not None:
                    self.receiver.on_step = None
            log.error("trace recorder stopped: cannot write: %s; the agent goes on without recording", exc)
            self.state.recorder_failed(f"{type(exc).__name__}: {exc}")
            try:
                writer.close()
            except OSError as close_exc:  # the buffered tail cannot be flushed either; the file is closed
                log.debug("closing the failed trace: %s", close_exc)

    # ---------------------------------------------------------------- running

    def start_receiver(self) -> None:
        """Bind the phase socket (OSError / ValueError if it cannot be: strict at start-up)."""
        if self.receiver is not None and self.receiver._thread is None:
            self.receiver.start()

    def run(self) -> None:
        """Tick until :meth:`stop`; sleeps until the next sampler is due."""
        self.start_receiver()
        self.state.mark_started()
        try:
            while not self._stop.is_set():
                self.tick()
                now = self.clock()
                due = min([s.next_ns for s in self.samplers] + [self._next_attr_ns])
                self._stop.wait(max(0.0, (due - now) / 1e9))
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        for sch in self.samplers:
            close = getattr(sch.sampler, "close", None)
            if close is not None:
                close()
        if self.recorder is not None:
            try:
                self.recorder.close()
            except OSError as exc:  # the last buffered records cannot be written (disk full)
                log.error("trace recorder: closing failed: %s", exc)
                self.state.recorder_failed(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- HTTP: /metrics and /health


def health(state: AgentState) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when started and every sampler's last poll succeeded, else 503."""
    snap = state.snapshot()
    samplers = {name: {"success": h.success, "duration_s": round(h.duration_s, 6), "error": h.last_error}
                for name, h in snap.samplers.items()}
    ok = snap.started and bool(samplers) and all(s["success"] for s in samplers.values())
    status = "ok" if ok else ("starting" if not snap.started or not samplers else "degraded")
    body = {"status": status, "gpus": sorted(snap.gpus), "samplers": samplers,
            "shim_received": snap.shim_received, "shim_rejected": snap.shim_rejected,
            "sampler_errors": snap.sampler_errors, "recorder_error": snap.recorder_error or None}
    return (200 if ok else 503), body


def make_http_server(state: AgentState, address: str, port: int) -> ThreadingHTTPServer:
    """The agent's HTTP server: ``/metrics`` (Prometheus text) and ``/health`` (JSON)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from phaselens.exporters.prometheus import agent_registry

    from phaselens.agent.receiver import REASONS

    registry = agent_registry(state, REASONS)  # every rejection reason exported from the start, at 0

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, code, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path == "/health":
                code, doc = health(state)
                body, ctype = json.dumps(doc).encode(), "application/json"
            else:
                body, code = b'{"error": "not found; try /metrics or /health"}', 404
                ctype = "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

    return ThreadingHTTPServer((address, port), Handler)


# ---------------------------------------------------------------- building from a config


def build_daemon(config: AgentConfig, state: AgentState | None = None, *, nvml: Any = None,
                 with_receiver: bool = True) -> AgentDaemon:
    """Samplers, receiver and timeline for ``config``. ValueError names a bad value (the CLI turns it into
    click.BadParameter); strict here, lenient later while collecting."""
    if config.source not in SOURCES:
        raise ValueError(f"unknown source {config.source!r}; expected one of {', '.join(SOURCES)}")
    AttributionConfig(method=config.method, horizon_s=config.horizon_s)  # validates both
    state = state or AgentState(config.hostname)
    timeline = Timeline(horizon_s=config.horizon_s)
    samplers: list[tuple[Any, float]] = []
    gpus: list[GpuIdentity] = []
    known: set[str] | None = None
    uuids = config.gpus or None
    simulated: set[str] = set()  # GPUs of a replayed trace whose counters were simulated
    if config.source in ("gpm", "nvml"):
        samplers, gpus = _nvml_samplers(config, nvml, uuids)
        known = {g.uuid for g in gpus} if gpus else None
    elif config.source == "dcgm":
        from phaselens.agent.samplers.dcgm import DcgmSampler

        # dcgm-exporter refreshes its page on its own collect interval (1 s or more): scraping it every few
        # ms only costs; it is polled at the NVML interval
        samplers.append((DcgmSampler(url=config.dcgm_url, uuids=uuids, hostname=config.hostname),
                         config.nvml_interval_ms))
        known = set(uuids) if uuids else None
    elif config.source == "simulated":
        from phaselens.agent.samplers.simulated import SimulatedSampler

        if config.simulated_gpus < 1:
            raise ValueError(f"simulated_gpus must be >= 1, got {config.simulated_gpus}")
        sim_uuids = [f"GPU-sim-{i}" for i in range(config.simulated_gpus)]
        samplers.append((SimulatedSampler(sim_uuids, timeline, seed=config.seed), config.poll_interval_ms))
        gpus = [GpuIdentity(uuid=u, index=i, name="simulated", source="simulated")
                for i, u in enumerate(sim_uuids)]
        known = set(sim_uuids)
    else:
        from phaselens.agent.samplers.replay import ReplaySampler

        if not config.replay_trace:
            raise ValueError("source 'replay' needs a trace file (--replay-trace)")
        replay = ReplaySampler(config.replay_trace, speed=config.replay_speed)
        if not replay.trace.steps and not replay.trace.samples:
            raise ValueError(f"{config.replay_trace} holds no step or sample records to replay "
                             f"({replay.trace.malformed} malformed lines)")
        samplers.append((replay, config.poll_interval_ms))
        meta = replay.trace.meta
        # a replayed trace of simulated counters stays labelled simulated
        simulated = {s.gpu_uuid for s in replay.trace.samples if s.source == "simulated"}
        gpus = [GpuIdentity(uuid=g.uuid, index=g.index, name=g.name,
                            source="simulated" if g.uuid in simulated else "replay")
                for g in (meta.gpus if meta else ())]
        with_receiver = False  # the steps come from the trace
    receiver = PhaseReceiver(config.socket_path, state, timeline, known_gpus=known) if with_receiver else None
    daemon = AgentDaemon(config, state, timeline, samplers, gpus, receiver)
    if simulated:
        daemon.source_label = "simulated"
    return daemon


def _nvml_samplers(config: AgentConfig, nvml: Any, uuids: list[str] | None
                   ) -> tuple[list[tuple[Any, float]], list[GpuIdentity]]:
    """The GPM and/or NVML samplers. If NVML cannot start (no driver, no GPU), they are deferred: the agent
    serves its health metrics and retries (agent/samplers/deferred.py)."""
    from phaselens.agent.samplers.deferred import DeferredSampler
    from phaselens.agent.samplers.gpm import GpmSampler
    from phaselens.agent.samplers.nvml import NvmlSampler

    def make_gpm() -> GpmSampler:
        gpm = GpmSampler(nvml=nvml, uuids=uuids)
        if not gpm.gpus:
            raise ValueError("source 'gpm': no GPU here supports GPM (Hopper or newer); "
                             "use --source nvml or dcgm")
        return gpm

    factories: list[tuple[str, Callable[[], Any], float]] = [
        ("nvml", lambda: NvmlSampler(nvml=nvml, uuids=uuids),
         config.nvml_interval_ms if config.source == "gpm" else config.poll_interval_ms)]
    if config.source == "gpm":
        factories.insert(0, ("gpm", make_gpm, config.poll_interval_ms))
    samplers: list[tuple[Any, float]] = []
    for name, factory, interval_ms in factories:
        try:
            samplers.append((factory(), interval_ms))
        except ValueError:
            raise  # a configuration this hardware cannot have: strict at start-up
        except Exception as exc:  # noqa: BLE001 - NVMLError (no driver, no GPU) is no OSError
            samplers.append((DeferredSampler(name, factory, f"{type(exc).__name__}: {exc}"), interval_ms))
    nv = samplers[-1][0]
    gpus = [GpuIdentity(uuid=g.uuid, index=g.index, name=g.name, source=config.source)
            for g in getattr(nv, "gpus", [])]
    return samplers, gpus
