"""``phaselens agent``, ``phaselens record`` and ``phaselens attribute``.

Strict at start-up: every flag has a ``PHASELENS_*`` environment variable and units in its name, and a bad
value stops the command with a usage error naming it (click.BadParameter), never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from phaselens.agent.daemon import SOURCES, AgentConfig
from phaselens.cli import FiniteRange

log = logging.getLogger(__name__)


def _common(fn: Any) -> Any:
    """Flags shared by ``agent`` and ``record``."""
    options = [
        click.option("--source", type=click.Choice(SOURCES), default="gpm", show_default=True,
                     envvar="PHASELENS_SOURCE", help="Where GPU counters come from."),
        click.option("--socket-path", default="/run/phaselens/phaselens.sock", show_default=True,
                     envvar="PHASELENS_SOCKET_PATH", help="Unix datagram socket the engines' shims send to."),
        click.option("--poll-interval-ms", type=FiniteRange(1.0, 10_000.0), default=10.0,
                     show_default=True, envvar="PHASELENS_POLL_INTERVAL_MS",
                     help="Poll interval around an expected counter refresh (GPM sleeps between)."),
        click.option("--nvml-interval-ms", type=FiniteRange(10.0, 60_000.0), default=1000.0,
                     show_default=True, envvar="PHASELENS_NVML_INTERVAL_MS",
                     help="Poll interval of the NVML fields next to GPM, and of --source dcgm."),
        click.option("--horizon-s", type=FiniteRange(5.0, 3600.0), default=60.0, show_default=True,
                     envvar="PHASELENS_HORIZON_S", help="Sliding horizon of the attribution."),
        click.option("--gpu", "gpus", multiple=True, envvar="PHASELENS_GPUS",
                     help="GPU UUID to watch (repeatable; default all)."),
        click.option("--dcgm-url", default="http://localhost:9400/metrics", show_default=True,
                     envvar="PHASELENS_DCGM_URL", help="dcgm-exporter /metrics (--source dcgm)."),
        click.option("--simulated-gpus", type=click.IntRange(1, 64), default=1, show_default=True,
                     envvar="PHASELENS_SIMULATED_GPUS", help="GPU-sim-<n> count (--source simulated)."),
        click.option("--replay-trace", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="PHASELENS_REPLAY_TRACE", help="Trace file to replay (--source replay)."),
        click.option("--replay-speed", type=FiniteRange(0.01, 1000.0, min_open=False), default=1.0,
                     show_default=True, envvar="PHASELENS_REPLAY_SPEED"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(**kw: Any) -> AgentConfig:
    cfg = AgentConfig(source=kw["source"], socket_path=kw["socket_path"],
                      poll_interval_ms=kw["poll_interval_ms"],
                      nvml_interval_ms=kw["nvml_interval_ms"], horizon_s=kw["horizon_s"],
                      gpus=[g.strip() for g in kw["gpus"] if g.strip()], dcgm_url=kw["dcgm_url"],
                      simulated_gpus=kw["simulated_gpus"], replay_trace=kw["replay_trace"],
                      replay_speed=kw["replay_speed"])
    for key in ("method", "attribute_interval_s", "listen_address", "port"):
        if key in kw:
            setattr(cfg, key, kw[key])
    if cfg.source == "replay" and not cfg.replay_trace:
        raise click.BadParameter("--source replay needs --replay-trace FILE", param_hint="--replay-trace")
    if cfg.source == "dcgm" and not (cfg.dcgm_url.startswith(("http://", "https://"))
                                     and urlparse(cfg.dcgm_url).hostname):
        raise click.BadParameter(f"{cfg.dcgm_url!r} is not an http(s) URL with a host",
                                 param_hint="--dcgm-url")
    if "listen_address" in kw:
        try:
            socket.getaddrinfo(cfg.listen_address, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise click.BadParameter(f"{cfg.listen_address!r} is not an address to listen on: {exc}",
                                     param_hint="--listen-address") from None
    sock_dir = Path(cfg.socket_path).parent
    if cfg.source != "replay" and sock_dir.exists() and not sock_dir.is_dir():
        raise click.BadParameter(f"{sock_dir} is not a directory", param_hint="--socket-path")
    return cfg


def _build(cfg: AgentConfig, **kw: Any) -> Any:
    from phaselens.agent.daemon import build_daemon

    try:
        return build_daemon(cfg, **kw)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except ImportError as exc:
        raise click.UsageError(f"source {cfg.source!r} cannot start: {exc}") from None
    except OSError as exc:  # NVML library missing, socket folder not writable, ...
        raise click.UsageError(f"source {cfg.source!r} cannot start: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pynvml's NVMLError (no GPU, no driver) is not an OSError
        if type(exc).__name__.startswith("NVMLError"):
            raise click.UsageError(f"NVML cannot start ({exc}); no NVIDIA driver? try --source simulated") \
                from None
        raise


def _otlp(daemon: Any) -> Any:
    """The OTLP exporter the standard OTEL_* variables configure, or None without an endpoint; a bad value
    is a usage error naming the variable."""
    endpoints = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not any(os.environ.get(v) for v in endpoints):
        return None  # no OTLP asked for: the SDK need not even be installed
    try:
        from phaselens.exporters.otlp import from_environment

        return from_environment(daemon.state)
    except (ValueError, ImportError) as exc:
        daemon.close()
        raise click.UsageError(f"OTLP export: {exc}") from None


def _start_receiver(daemon: Any, cfg: AgentConfig) -> None:
    try:
        daemon.start_receiver()
    except (OSError, ValueError) as exc:
        daemon.close()
        raise click.BadParameter(f"cannot listen on {cfg.socket_path}: {exc}", param_hint="--socket-path") \
            from None


def _stop_on_signals(stop: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


@click.command("agent")
@_common
@click.option("--method", type=click.Choice(["unmix", "naive"]), default="unmix", show_default=True,
              envvar="PHASELENS_METHOD", help="Attribution method.")
@click.option("--attribute-interval-s", type=FiniteRange(0.1, 600.0), default=15.0, show_default=True,
              envvar="PHASELENS_ATTRIBUTE_INTERVAL_S",
              help="How often the attribution is recomputed (default: the PodMonitor's scrape interval; more "
                   "often only computes results no scrape reads).")
@click.option("--listen-address", default="0.0.0.0", show_default=True, envvar="PHASELENS_LISTEN_ADDRESS")
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              envvar="PHASELENS_PORT",
              help="HTTP port of /metrics and /health.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="PHASELENS_RECORD", help="Also write a trace (steps and every sample) to this file.")
def agent(record_path: Path | None, **kw: Any) -> None:
    """Run the node agent: sample GPUs, receive phases, attribute, serve /metrics and /health.

    With OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) set, the same metrics are also
    pushed over OTLP (OTEL_EXPORTER_OTLP_PROTOCOL http/protobuf or grpc, every OTEL_METRIC_EXPORT_INTERVAL
    ms)."""
    cfg = _config(**kw)
    daemon = _build(cfg)
    otlp = _otlp(daemon)
    if record_path is not None:
        from phaselens.trace import TraceWriter

        try:
            daemon.record_to(TraceWriter(record_path))
        except OSError as exc:
            daemon.close()
            raise click.BadParameter(f"cannot write {record_path}: {exc}", param_hint="--record") from None
    _start_receiver(daemon, cfg)
    from phaselens.agent.daemon import make_http_server

    try:
        server = make_http_server(daemon.state, cfg.listen_address, cfg.port)
    except OSError as exc:
        daemon.close()
        raise click.BadParameter(f"cannot listen on {cfg.listen_address}:{cfg.port}: {exc}",
                                 param_hint="--port") from None
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    click.echo(f"phaselens agent: source={cfg.source} socket={cfg.socket_path} "
               f"http://{cfg.listen_address}:{server.server_address[1]}/metrics", err=True)
    _stop_on_signals(daemon.stop)
    try:
        daemon.run()
    finally:
        server.shutdown()
        if otlp is not None:
            otlp.shutdown()  # the last export


@click.command("record")
@_common
@click.argument("output", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--duration-s", type=FiniteRange(0.0, min_open=True), default=None,
              envvar="PHASELENS_DURATION_S", help="Stop after this long (default: until Ctrl-C).")
def record(output: Path, duration_s: float | None, **kw: Any) -> None:
    """Record a trace: meta, the steps the shims send, and every sample, as JSON Lines in OUTPUT."""
    from phaselens.trace import TraceWriter

    cfg = _config(**kw)
    daemon = _build(cfg)
    try:
        writer = TraceWriter(output)
    except OSError as exc:
        daemon.close()
        raise click.BadParameter(f"cannot write {output}: {exc}", param_hint="OUTPUT") from None
    daemon.record_to(writer)
    _start_receiver(daemon, cfg)  # after record_to: no step arrives unrecorded
    daemon.config.attribute_interval_s = 1e9  # recording only; attribution happens offline
    _stop_on_signals(daemon.stop)
    if duration_s is not None:
        timer = threading.Timer(duration_s, daemon.stop)
        timer.daemon = True
        timer.start()
    started = time.monotonic()
    try:
        daemon.run()
    finally:
        try:
            writer.close()
        except OSError as exc:  # the last buffered records could not be written either
            daemon.state.recorder_failed(f"{type(exc).__name__}: {exc}")
    failed = daemon.state.snapshot().recorder_error
    if failed:  # the recording is what this command is for: say it is incomplete, exit non-zero
        raise click.ClickException(f"recording to {output} stopped after "
                                   f"{time.monotonic() - started:.1f} s: {failed}; the trace is incomplete")
    click.echo(f"recorded {output} ({time.monotonic() - started:.1f} s)", err=True)


@click.command("attribute")
@click.argument("trace_path", metavar="TRACE", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print DESIGN.md's JSON shape.")
@click.option("--method", type=click.Choice(["unmix", "naive"]), default="unmix", show_default=True,
              envvar="PHASELENS_METHOD")
@click.option("--horizon-s", type=FiniteRange(1.0, min_open=False), default=None,
              help="Attribute only the last N seconds (default: the whole trace).")
def attribute(trace_path: str, as_json: bool, method: str, horizon_s: float | None) -> None:
    """Attribute a recorded TRACE offline and print per-phase values per GPU."""
    from phaselens.agent.attribution import AttributionConfig, Attributor, attribution_to_dict
    from phaselens.agent.state import GpuIdentity
    from phaselens.gpus import find_gpu_spec
    from phaselens.trace import read_trace

    trace = read_trace(trace_path)
    if not trace.steps and not trace.samples:
        raise click.BadParameter(f"{trace_path} holds no step or sample records", param_hint="TRACE")
    names = {g.uuid: g for g in trace.meta.gpus} if trace.meta else {}
    out: dict[str, Any] = {"gpus": {}}
    span = max([s.t_ns for s in trace.samples] + [s.t1_ns for s in trace.steps]) - \
        min([s.t_ns for s in trace.samples] + [s.t0_ns for s in trace.steps])
    horizon = horizon_s if horizon_s is not None else max(span / 1e9 + 1.0, 1.0)
    attributor = Attributor(AttributionConfig(method=method, horizon_s=horizon))
    for uuid in trace.gpu_uuids():
        info = names.get(uuid)
        ident = GpuIdentity(uuid=uuid, index=info.index if info else -1, name=info.name if info else "")
        spec = find_gpu_spec(ident.name) if ident.name else None
        result = attributor.attribute(ident, trace.steps, trace.samples, spec=spec)
        doc = attribution_to_dict(result)
        if spec is None:
            doc["mfu_mbu"] = f"unknown GPU {ident.name!r}: no peak figures, MFU/MBU not reported"
        out["gpus"][uuid] = doc
    if trace.malformed:
        out["malformed_records_skipped"] = trace.malformed
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    _print_table(out)


def _print_table(out: dict[str, Any]) -> None:
    for uuid, doc in out["gpus"].items():
        offset = doc["alignment_offset_ms"]
        click.echo(f"{uuid}  method={doc['method']}  windows={doc['windows']}  "
                   f"offset={'n/a' if offset is None else f'{offset:.1f} ms'}")
        click.echo(f"  {'phase':<8} {'time':>6} {'sm_active':>16} {'tensor_active':>16} {'dram_active':>16}"
                   f" {'mfu':>6} {'mbu':>6}")
        for phase, entry in doc["phases"].items():
            if phase == "idle":
                click.echo(f"  {phase:<8} {entry['time_share']:>6.1%}")
                continue
            if "status" in entry:
                click.echo(f"  {phase:<8} {entry['time_share']:>6.1%}  {entry['status']}")
                continue
            cells = []
            for key in ("sm_active", "tensor_active", "dram_active"):
                v, u = entry.get(key), entry.get("uncertainty", {}).get(key)
                cells.append("-" if v is None else f"{v:.3f}±{u:.3f}" if u is not None else f"{v:.3f}")
            mfu = f"{entry['mfu']:.3f}" if "mfu" in entry else "-"
            mbu = f"{entry['mbu']:.3f}" if "mbu" in entry else "-"
            click.echo(f"  {phase:<8} {entry['time_share']:>6.1%} "
                       f"{cells[0]:>16} {cells[1]:>16} {cells[2]:>16}"
                       f" {mfu:>6} {mbu:>6}")
        blended = ", ".join(f"{k}={v:.3f}" for k, v in doc["blended"].items())
        click.echo(f"  blended: {blended}")
        if "mfu_mbu" in doc:
            click.echo(f"  {doc['mfu_mbu']}")
