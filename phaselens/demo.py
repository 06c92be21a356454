"""``phaselens demo``: the whole product on one machine, in one command.

It starts the node agent (real NVML/GPM on a GPU, otherwise the simulated source, said plainly) and the
bundled engine, drives a seeded load through the OpenAI-compatible API, then prints the blended-vs-split
table that is the point of phaselens, the advisor's verdict for a fleet, and where the report, the trace and
the metrics are. Every part runs as its own process, exactly as an operator would run it, through the same
commands (`phaselens agent`, `serve`, `load`, `advise`); the demo stops everything it started, also on Ctrl-C.

    make demo                     # tiny model, simulated GPU counters, about a minute on a laptop
    phaselens demo --preset llama-3.1-8b     # on a GPU node: real counters
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from phaselens.cli import FiniteRange

#: Presets from the largest down, with the GPU memory (GiB) each needs for weights plus a useful KV cache.
_PRESET_MEMORY_GIB = (("llama-3.1-8b", 40), ("llama-3.2-1b", 12), ("tiny", 0))
_TABLE_METRICS = ("sm_active", "tensor_active", "dram_active", "gpu_util")
_CPU_PLAN_GPU = "NVIDIA H100 80GB HBM3"


@dataclass
class Plan:
    """What the demo will run, decided before anything starts."""

    gpu: bool
    source: str
    device: str
    preset: str
    gpu_name: str = ""


@dataclass
class Processes:
    """The processes the demo started; :meth:`stop_all` ends them (SIGTERM, then SIGKILL)."""

    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "wb")
        # A new session: Ctrl-C reaches the demo only, which then stops the children in order.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.running.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.running:
            if proc.poll() is not None:
                raise click.ClickException(f"the {name} exited with status {proc.returncode}; see its log")

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for _, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self.running):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_http(url: str, procs: Processes, deadline_s: float, what: str, ok_codes: tuple[int, ...]) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        procs.check()
        try:
            if _get(url)[0] in ok_codes:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise click.ClickException(f"the {what} did not answer at {url} within {deadline_s:.0f} s")


def plan_run(preset: str, device: str) -> Plan:
    """GPU or not, which source and which preset: the largest preset that fits, ``tiny`` on CPU."""
    gpu_name, memory_gib = "", 0.0
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                gpu_name, memory_gib = props.name, props.total_memory / 2**30
        except ImportError:
            pass
    if device.startswith("cuda") and not gpu_name:
        raise click.BadParameter(f"{device!r}: no CUDA GPU is visible here", param_hint="--device")
    gpu = bool(gpu_name)
    if preset == "auto":
        preset = next(name for name, need in _PRESET_MEMORY_GIB if (
            need == 0 or (gpu and memory_gib >= need)))
    return Plan(gpu=gpu, source="gpm" if gpu else "simulated", device="cuda:0" if gpu else "cpu",
                preset=preset, gpu_name=gpu_name)


def read_split(metrics_text: str) -> dict[str, dict[str, Any]]:
    """Per GPU UUID: blended values, per-phase values and time shares, from the agent's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    gpus: dict[str, dict[str, Any]] = {}

    def gpu(labels: dict[str, str]) -> dict[str, Any]:
        return gpus.setdefault(labels.get("gpu_uuid", "?"), {"blended": {}, "phases": {}, "time_share": {}})

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "phaselens_gpu_utilization_ratio":
                gpu(labels)["blended"][labels["metric"]] = sample.value
            elif sample.name == "phaselens_phase_utilization_ratio":
                gpu(labels)["phases"].setdefault(labels["phase"], {})[labels["metric"]] = sample.value
            elif sample.name == "phaselens_phase_time_ratio":
                gpu(labels)["time_share"][labels["phase"]] = sample.value
    return gpus


def print_split(gpus: dict[str, dict[str, Any]]) -> None:
    """The table: one blended number next to what prefill, decode and mixed steps really do."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for uuid, g in sorted(gpus.items()):
        phases = [p for p in ("prefill", "decode", "mixed") if p in g["phases"]]
        table = Table(title=f"{uuid}: blended vs per phase", title_justify="left")
        table.add_column("metric")
        table.add_column("blended", justify="right")
        for p in phases:
            table.add_column(p, justify="right")
        for key in _TABLE_METRICS:
            if key not in g["blended"] and not any(key in g["phases"][p] for p in phases):
                continue
            row = [key, _pct(g["blended"].get(key))]
            row += [_pct(g["phases"][p].get(key)) for p in phases]
            table.add_row(*row)
        share = ["time share", _pct(sum(v for k, v in g["time_share"].items() if k != "idle") or None)]
        share += [_pct(g["time_share"].get(p)) for p in phases]
        table.add_row(*share)
        console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


@click.command()
@click.option("--preset", default="auto", show_default=True,
              help="Model preset; auto = the largest that fits the GPU, tiny on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--requests", "num_requests", type=click.IntRange(min=1), default=120, show_default=True)
@click.option("--rate", type=FiniteRange(min=0, min_open=True), default=6.0, show_default=True,
              help="Requests per second.")
@click.option("--fleet-gpus", type=click.IntRange(min=1), default=16, show_default=True,
              help="Fleet size the advisor plans for.")
@click.option("--price", type=FiniteRange(min=0), default=2.0, show_default=True, help="$ per GPU-hour.")
@click.option("--ttft-ms", type=FiniteRange(min=0, min_open=True), default=None,
              help="TTFT target for the advisor (default: 2000 on CPU, 500 on a GPU).")
@click.option("--tpot-ms", type=FiniteRange(min=0, min_open=True), default=None,
              help="TPOT target for the advisor (default: 100 on CPU, 50 on a GPU).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="phaselens-demo",
              show_default=True,
              help="Where the report, trace, logs and demo.json go (emptied first).")
@click.option("--warmup-requests", "warmup", type=click.IntRange(min=0), default=None,
              help="Requests sent before the agent starts, not measured (default: 32 on a GPU, 8 on CPU).")
@click.option("--quick", is_flag=True, help="A short run (tests, smoke checks).")
@click.option("--keep-running", is_flag=True,
              help="Leave agent and engine up after the report (their /metrics for Prometheus) until Ctrl-C.")
def demo(preset: str, device: str, num_requests: int, rate: float, fleet_gpus: int, price: float,
         ttft_ms: float | None, tpot_ms: float | None, out_dir: str, warmup: int | None, quick: bool,
         keep_running: bool) -> None:
    """Start engine, agent and load; show the blended vs per-phase split and the advisor's verdict."""
    from phaselens.engine.config import PRESETS

    if preset != "auto" and preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; known: auto, {', '.join(PRESETS)}",
                                 param_hint="--preset")
    if device not in ("auto", "cpu", "cuda"):
        raise click.BadParameter(f"{device!r}: expected auto, cpu or cuda", param_hint="--device")
    plan = plan_run(preset, device)
    if quick:
        num_requests = min(num_requests, 60)
    if warmup is None:
        warmup = 32 if plan.gpu else 8
    ttft_ms = ttft_ms or (500.0 if plan.gpu else 2000.0)
    tpot_ms = tpot_ms or (50.0 if plan.gpu else 100.0)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run_dir = Path(tempfile.mkdtemp(prefix="phaselens-"))  # the socket path must stay under 108 bytes
    procs = Processes()
    # SIGTERM (a container stop) takes the same way out as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = _run(plan, procs, out, run_dir, num_requests, warmup, rate, fleet_gpus, price, ttft_ms,
                      tpot_ms, quick)
        (out / "demo.json").write_text(json.dumps(result, indent=2))
        if keep_running:
            click.echo("agent and engine keep running; Ctrl-C stops them")
            while True:
                procs.check()
                time.sleep(1.0)
    except KeyboardInterrupt:
        if keep_running and (out / "demo.json").exists():
            click.echo(f"\nstopped; summary: {out / 'demo.json'}")
            return
        click.echo("\ninterrupted: stopping everything the demo started", err=True)
        raise SystemExit(130)
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(run_dir, ignore_errors=True)
    click.echo(f"\nsummary: {out / 'demo.json'}")


def _run(plan: Plan, procs: Processes, out: Path, run_dir: Path, num_requests: int, warmup: int, rate: float,
         fleet_gpus: int, price: float, ttft_ms: float, tpot_ms: float, quick: bool) -> dict[str, Any]:
    py = [sys.executable, "-m", "phaselens"]
    sock = str(run_dir / "phaselens.sock")
    agent_port, engine_port = _free_port(), _free_port()
    if plan.gpu:
        click.echo(f"GPU: {plan.gpu_name}. The agent samples real NVML/GPM counters.")
    else:
        click.secho("No GPU here: the agent uses the SIMULATED source (GPM-like counters generated from the "
                    "engine's real steps, labelled source=\"simulated\").", fg="yellow")
    click.echo(f"engine: phaselens serve --preset {plan.preset} on {plan.device}; outputs in {out}/")

    engine_args = py + ["serve", "--preset", plan.preset, "--device", plan.device, "--port", str(engine_port),
                        "--request-log", str(out / "requests.jsonl"), "--shim-socket", sock,
                        "--shim-jsonl", str(out / "steps.jsonl")]
    procs.start("engine", engine_args, out / "engine.log")
    engine_url = f"http://127.0.0.1:{engine_port}"
    _wait_http(engine_url + "/health", procs, 900 if plan.gpu else 120, "engine", (200,))

    # Long prompts (RAG-like) and short answers, so that prefill time adds up to enough counter windows for
    # the attribution to speak of prefill and mixed steps too, not only decode.
    lengths = ["--prompt-median", "1000", "--prompt-max", "1900", "--output-median", "48",
               "--output-max", "128"]
    if warmup:
        # Keep warm-up out of the measurement (gpt-fast's rule): an engine's first steps of each new shape pay
        # one-time costs (kernel compilation, library plans) that a serving engine paid long ago. The agent
        # starts after it, so its horizon holds only the measured load.
        click.echo(f"warm-up: {warmup} requests, not measured")
        subprocess.run(py + ["load", "--url", engine_url, "-n", str(warmup), "--rate", "inf", "--seed", "1",
                             "--max-concurrency", "8", "--no-progress", *lengths],
                       check=True, stdout=subprocess.DEVNULL)
    agent_args = py + ["agent", "--source", plan.source, "--socket-path", sock,
                       "--listen-address", "127.0.0.1",
                       "--port", str(agent_port), "--attribute-interval-s", "1", "--horizon-s", "300",
                       "--record", str(out / "trace.jsonl")]
    procs.start("agent", agent_args, out / "agent.log")
    agent_url = f"http://127.0.0.1:{agent_port}"
    _wait_http(agent_url + "/health", procs, 30, "agent", (200, 503))

    load_args = py + ["load", "--url", engine_url, "-n", str(num_requests), "--rate", str(rate),
                      "--seed", "0", *lengths,
                      "--slo-ttft", str(ttft_ms / 1e3), "--slo-tpot", str(tpot_ms / 1e3),
                      "--json", str(out / "load.json")]
    click.echo(f"load: {num_requests} requests at {rate:g} req/s")
    subprocess.run(load_args, check=True)
    procs.check()

    split = _wait_for_split(agent_url, procs, deadline_s=30)
    click.echo("")
    print_split(split)

    advise_args = py + ["advise", "--trace", str(out / "steps.jsonl"),
                        "--request-log", str(out / "requests.jsonl"),
                        "--preset", plan.preset, "--rate", str(rate),
                        "--gpus", str(fleet_gpus), "--price", str(price),
                        "--ttft-ms", str(ttft_ms), "--tpot-ms", str(tpot_ms),
                        "--html", str(out / "report.html"),
                        "--seeds", "1", "--requests", "300" if quick else "1000", "--json"]
    # On CPU the step times are the tiny model's on this CPU; the fleet plan still needs a GPU's memory and
    # peaks, and says which one it assumed.
    advise_args += ["--gpu", plan.gpu_name if plan.gpu else _CPU_PLAN_GPU]
    advice_run = subprocess.run(advise_args, capture_output=True, text=True)
    (out / "advise.log").write_text(advice_run.stderr)
    advice: dict[str, Any] | None = None
    if advice_run.returncode == 0:
        advice = json.loads(advice_run.stdout)
        (out / "advice.json").write_text(advice_run.stdout)
        gain = advice.get("gain")
        if not plan.gpu:
            click.echo(f"\n(CPU run: step times are {plan.preset}'s on this CPU; GPU memory and peaks of an "
                       f"{_CPU_PLAN_GPU} assumed for the fleet plan)")
        click.echo(f"\nadvisor, {fleet_gpus} GPUs at ${price:g}/GPU-hour, "
                   f"TTFT {ttft_ms:g} ms / TPOT {tpot_ms:g} ms:"
                   f" {str(advice['verdict']).upper()}"
                   + (f" (split gain {gain * 100:+.0f}% vs margin {advice['margin'] * 100:.0f}%)"
                      if isinstance(gain, (int, float)) else ""))
        # what ruled the other verdicts out (a gain above the margin can still fail the robustness checks)
        for why in advice.get("not_recommended_because", [])[:3]:
            click.echo(f"  - not recommended: {why}")
        for reason in advice.get("reasons", [])[:3]:
            if isinstance(reason, dict) and reason.get("text"):
                click.echo(f"  - {reason['text']}")
    else:
        click.secho(f"advisor could not decide: {advice_run.stderr.strip().splitlines()[-1:]}", fg="yellow")

    click.echo(f"\nHTML report   {out / 'report.html'}")
    click.echo(
        f"trace         {out / 'trace.jsonl'} (steps and samples; steps alone in {out / 'steps.jsonl'})")
    click.echo(f"metrics       {agent_url}/metrics (agent), {engine_url}/metrics (engine) while the demo runs"
               " (--keep-running leaves them up)")
    load_summary = json.loads((out / "load.json").read_text()).get("summary", {})
    return {"plan": plan.__dict__, "split": split, "advice": advice, "load": load_summary,
            "files": {"report": str(out / "report.html"), "trace": str(out / "trace.jsonl"),
                      "steps": str(out / "steps.jsonl"), "requests": str(out / "requests.jsonl")}}


def _wait_for_split(agent_url: str, procs: Processes, deadline_s: float) -> dict[str, dict[str, Any]]:
    """Poll the agent's /metrics until every busy phase that ran has per-phase values, or the deadline passes
    (a phase with too little time in the horizon stays "not enough data": the table shows "-")."""
    end = time.monotonic() + deadline_s
    split: dict[str, dict[str, Any]] = {}
    while time.monotonic() < end:
        procs.check()
        split = read_split(_get(agent_url + "/metrics")[1].decode())
        ran = {p for g in split.values() for p, share in g["time_share"].items() if p != "idle" and share > 0}
        have = {p for g in split.values() for p in g["phases"]}
        if ran and ran <= have:
            return split
        time.sleep(0.5)
    if not any(g["phases"] for g in split.values()):
        raise click.ClickException(f"the agent attributed nothing within {deadline_s:.0f} s (see agent.log): "
                                   f"not enough data")
    return split


if __name__ == "__main__":  # pragma: no cover
    demo()
