"""Soak: agent + engine + load for a stated duration at an accelerated event rate (issue 10).

Starts, as real processes, ``phaselens agent --source simulated`` and ``phaselens serve --preset tiny``
(its worker's shim sends to the agent), then for ``--duration-s`` keeps:

- HTTP load on the engine (``--concurrency`` clients, short completions, back to back),
- an accelerated step flood straight into the agent's socket (``--flood-rate`` records/s spread over the
  other simulated GPUs: many engines' worth of steps on one agent),
- Prometheus-like scrapes of both ``/metrics`` every second.

Every ``--sample-s`` it reads each process's resident memory (VmRSS) and open file descriptors from /proc.
It reports the memory slope (least squares after ``--warmup-s``, MiB per hour) of the agent, the engine
front-end and its worker, the fd counts at the start and end of the measured part, and the requests that
failed. Appends to bench/RESULTS.md unless ``--no-results``.

Run: ``python bench/soak.py --duration-s 240``
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.emitter import PhaseEmitter
from phaselens.trace import StepRecord

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> tuple[float, int]:
    """(resident MiB, open fds) of a process, from /proc."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    return rss_kib / 1024.0, len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
        except FileNotFoundError:
            continue
    return kids


def _label(pid: int) -> str:
    """A child of the engine: its worker, or multiprocessing's resource tracker."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    return "resource tracker" if "resource_tracker" in cmd else "engine worker"


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{proc.args[3]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 600:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"{url} did not answer in {timeout_s:.0f} s")


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _slope_mib_per_h(series: list[tuple[float, float]]) -> float:
    t = np.array([p[0] for p in series])
    y = np.array([p[1] for p in series])
    return float(np.polyfit(t, y, 1)[0] * 3600.0) if len(series) >= 3 else float("nan")


@click.command()
@click.option("--duration-s", type=click.FloatRange(10, min_open=False), default=240.0, show_default=True)
@click.option("--warmup-s", type=click.FloatRange(0), default=40.0, show_default=True,
              help="Left out of the slope (imports, first shapes, caches filling).")
@click.option("--sample-s", type=click.FloatRange(0.5), default=2.0, show_default=True)
@click.option("--flood-rate", type=click.FloatRange(0), default=2000.0, show_default=True,
              help="Extra step records per second sent to the agent (accelerated event rate).")
@click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True)
@click.option("--horizon-s", type=click.FloatRange(5), default=10.0, show_default=True,
              help="The agent's horizon (short: its timeline turns over many times in the run).")
@click.option("--results/--no-results", default=True, show_default=True, help="Append to bench/RESULTS.md.")
def main(duration_s: float, warmup_s: float, sample_s: float, flood_rate: float, concurrency: int,
         horizon_s: float, results: bool) -> None:
    """Run the soak and print the figures."""
    # SIGTERM stops the soak like Ctrl-C: the finally below stops the agent and the engine
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="phaselens-soak-"))
    sock = tmp / "phaselens.sock"
    agent_port, engine_port = _free_port(), _free_port()
    py = sys.executable
    agent = subprocess.Popen([py, "-m", "phaselens", "agent", "--source", "simulated",
                              "--simulated-gpus", "8", "--socket-path", str(sock),
                              "--listen-address", "127.0.0.1", "--port", str(agent_port),
                              "--horizon-s", str(horizon_s), "--attribute-interval-s", "1"],
                             stderr=subprocess.DEVNULL)
    engine = subprocess.Popen([py, "-m", "phaselens", "serve", "--preset", "tiny", "--workers", "1",
                               "--port", str(engine_port), "--shim-socket", str(sock),
                               "--num-kv-blocks", "256"],
                              stderr=subprocess.DEVNULL)
    agent_url, engine_url = f"http://127.0.0.1:{agent_port}", f"http://127.0.0.1:{engine_port}"
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0, "flood_sent": 0, "flood_dropped": 0, "scrapes": 0, "scrape_failures": 0}
    errors: list[str] = []
    lock = threading.Lock()
    try:
        _wait_http(agent_url + "/health", 120, agent)
        _wait_http(engine_url + "/health", 300, engine)
        workers = _children(engine.pid)
        click.echo(f"agent pid {agent.pid}, engine pid {engine.pid}, worker pids {workers}", err=True)

        def load() -> None:
            body = {"model": "tiny", "prompt": "soak " * 8, "max_tokens": 16, "ignore_eos": True}
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    try:
                        r = client.post(engine_url + "/v1/completions", json=body)
                        ok = r.status_code == 200
                        if not ok:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        ok = False
                        errors.append(repr(exc))
                    with lock:
                        counts["ok" if ok else "failed"] += 1

        emitter = PhaseEmitter(str(sock))

        def flood() -> None:
            n, tick = 0, 0.01
            per_tick = max(1, int(flood_rate * tick)) if flood_rate > 0 else 0
            while not stop.is_set() and per_tick:
                for _ in range(per_tick):
                    t1 = time.time_ns()
                    phase = Phase.PREFILL if n % 16 == 0 else Phase.DECODE
                    emitter.emit(StepRecord(f"GPU-sim-{1 + n % 7}", f"e{n % 7}", Role.COLOCATED, phase, n,
                                            t1 - 3_000_000, t1, Clock.GPU,
                                            512 if phase == Phase.PREFILL else 0,
                                            0 if phase == Phase.PREFILL else 32, 32, 2048, 1e12, 1e10))
                    n += 1
                counts["flood_sent"] = n
                emitter.retry()
                time.sleep(tick)

        def scrapes() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    for url in (agent_url, engine_url):
                        try:
                            ok = client.get(url + "/metrics").status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        counts["scrapes"] += 1
                        counts["scrape_failures"] += 0 if ok else 1
                    stop.wait(1.0)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(concurrency)]
        threads += [threading.Thread(target=flood, daemon=True),
                    threading.Thread(target=scrapes, daemon=True)]
        for th in threads:
            th.start()
        procs = {"agent": agent.pid, "engine front-end": engine.pid}
        procs.update({f"{_label(pid)} (pid {pid})": pid for pid in workers})
        series: dict[str, list[tuple[float, float, int]]] = {name: [] for name in procs}
        t_start = time.monotonic()
        while (elapsed := time.monotonic() - t_start) < duration_s:
            for name, pid in procs.items():
                rss, fds = _proc_status(pid)
                series[name].append((elapsed, rss, fds))
            if agent.poll() is not None or engine.poll() is not None:
                raise click.ClickException("the agent or the engine exited during the soak")
            time.sleep(sample_s)
        stop.set()
        for th in threads:
            th.join(30)
        agent_text = httpx.get(agent_url + "/metrics", timeout=10).text
        engine_text = httpx.get(engine_url + "/metrics", timeout=10).text
        emitter.close()  # records still parked for the agent are dropped here, and counted
        counts["flood_dropped"] = emitter.dropped
    finally:
        stop.set()
        for proc in (engine, agent):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (engine, agent):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    received = _metric_sum(agent_text, "phaselens_shim_events_received_total")
    rejected = _metric_sum(agent_text, "phaselens_shim_events_rejected_total")
    engine_errors = _metric_sum(engine_text, "phaselens_engine_requests_total", status="error")
    lines = [f"- duration {duration_s:.0f} s (slope over the last {duration_s - warmup_s:.0f} s, "
             f"after {warmup_s:.0f} s warm-up), samples every {sample_s:g} s; agent horizon {horizon_s:g} s, "
             f"simulated source, 8 simulated GPUs",
             f"- load: {concurrency} clients back to back on the tiny preset (1 CPU worker): "
             f"{counts['ok']} requests ok, {counts['failed']} failed "
             f"(engine's own error count: {engine_errors:.0f})",
             f"- accelerated events: {counts['flood_sent']} extra step records at {flood_rate:.0f}/s plus "
             f"the engine's own ({counts['flood_dropped']} of the extra dropped by the sender: agent queue "
             "full, or still parked at the end); "
             f"agent received {received:.0f}, rejected {rejected:.0f}; "
             f"{counts['scrapes']} scrapes, {counts['scrape_failures']} failed",
             "", "| process | RSS start MiB | RSS end MiB | slope MiB/h | fds start | fds end |",
             "|---|---|---|---|---|---|"]
    for name, pts in series.items():
        measured = [(t, r) for t, r, _ in pts if t >= warmup_s]
        fds = [f for t, _, f in pts if t >= warmup_s]
        first = next(p for p in pts if p[0] >= warmup_s)
        lines.append(f"| {name} | {first[1]:.1f} | {pts[-1][1]:.1f} | {_slope_mib_per_h(measured):+.1f} | "
                     f"{fds[0]} | {fds[-1]} |")
    if errors:
        lines.append(f"- first errors: {errors[:3]}")
    report = "\n".join(lines)
    click.echo(report)
    if results:
        cmd = "python bench/soak.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## {datetime.now(timezone.utc):%Y-%m-%d} — soak: agent + engine + load (issue 10), "
                     "CPU\n\n"
                     f"Command: `{cmd}` (machine: {platform.node()}, {platform.machine()}, "
                     f"{os.cpu_count()} cores, shared)\n\n{report}\n")


if __name__ == "__main__":
    main()
