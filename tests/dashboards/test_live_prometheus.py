"""Integration: a real Prometheus scrapes a running agent and engine; every dashboard panel returns data.

The stack, started once for this module, all on 127.0.0.1 with free ports:

- the engine: ``phaselens serve --preset tiny`` (CPU) in split mode (one prefill and one decode worker,
  so the KV hand-off panels have data), with a light stream of completions so its latency histograms
  move;
- the engine's shim sends its real steps to the agent's socket;
- two real agents when ``phaselens agent`` exists: ``--source replay`` over a trace of two H100s
  written by ``tests/exporters/agent_harness.py`` (attribution, MFU/MBU), and ``--source simulated``
  whose phase receiver gets the engine's steps (plus one malformed datagram, which must be counted);
  else the stand-in harness (AgentCollector over a state replayed from the same kind of trace);
- Prometheus (the Debian package), 1 s scrape and rule-evaluation interval, loaded with
  ``deploy/prometheus/phaselens-rules.yaml`` (group intervals set to 1 s for the test).

Skips, saying why, only where the prometheus binary is missing (``bash deploy/install-test-deps.sh``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from phaselens.cli import cli
from phaselens.dashboards.generator import PanelQuery, expand, load_dashboards, panel_queries
from tests.exporters.agent_harness import write_trace

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "phaselens-rules.yaml"
#: How long, from the stack's start, each query may take to return data (scrapes every 1 s).
DATA_DEADLINE_S = 90.0
RATE_INTERVAL = "30s"
#: Length of the replayed trace: longer than the test runs (the replay does not loop).
TRACE_SECONDS = 300.0

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus/promtool binaries are not installed: run `bash deploy/install-test-deps.sh` "
           "as root",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(what: str, check: Any, deadline_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args} exited with {p.returncode}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)  # polling interval of a condition with a deadline
    raise TimeoutError(f"{what} not ready after {deadline_s:g} s (last error: {last})")


@dataclass
class Stack:
    prometheus: str
    agent_metrics: list[str]
    engine: str
    agent_kind: str
    started: float
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = _get(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {data.get('error', body[:300])}")
        return list(data["data"]["result"])


def _real_agent_available() -> bool:
    # PHASELENS_LIVE_AGENT=harness forces the stand-in (to check that path where the agent exists).
    if os.environ.get("PHASELENS_LIVE_AGENT") == "harness":
        return False
    if importlib.util.find_spec("phaselens.agent.commands") is None:
        return False
    help_text = subprocess.run([sys.executable, "-m", "phaselens", "agent", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    return all(flag in help_text for flag in ("--replay-trace", "--socket-path", "--listen-address"))


def _agent_commands(tmp: Path, socket_path: Path) -> tuple[dict[str, tuple[list[str], int]], str]:
    """name -> (command, port) of the agents to run, and which kind they are.

    With ``phaselens agent`` present, two real agents: ``replay`` (a recorded-format trace of two H100s
    through the agent's own samplers, unmixing attribution and exporter) and ``simulated`` (its phase
    receiver on ``socket_path`` gets the test engine's real steps). Without it, the stand-in harness."""
    trace = tmp / "trace.jsonl"
    write_trace(trace, seconds=TRACE_SECONDS)
    if _real_agent_available():
        base = [sys.executable, "-m", "phaselens", "agent", "--listen-address", "127.0.0.1",
                "--attribute-interval-s", "1"]
        replay_port, sim_port = _free_port(), _free_port()
        return {
            "agent-replay": (base + ["--source", "replay", "--replay-trace", str(trace), "--socket-path",
                                     str(tmp / "unused.sock"), "--port", str(replay_port)], replay_port),
            "agent-simulated": (base + ["--source", "simulated", "--socket-path", str(socket_path),
                                        "--port", str(sim_port)], sim_port),
        }, "agent"
    port = _free_port()
    return {"agent-harness": ([sys.executable, "-m", "tests.exporters.agent_harness", "--port", str(port),
                               "--trace", str(trace)], port)}, "harness"


def _load(engine: str, stop: threading.Event) -> None:
    """A light, steady stream of completions so the engine's latency histograms keep moving."""
    body = json.dumps({"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 8}).encode()
    while not stop.is_set():
        req = urllib.request.Request(f"{engine}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except OSError:
            pass  # the engine going away at teardown
        stop.wait(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("live")
    engine_port, prom_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{name}.log", "wb")
        logs.append(log)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    stop = threading.Event()
    loader = None
    try:
        sock = tmp / "phaselens.sock"
        agents, agent_kind = _agent_commands(tmp, sock)
        for name, (cmd, _) in agents.items():
            start(name, cmd)
        # The engine's shim sends its real steps to the agent's socket (GPU-sim-0 and GPU-sim-1 on CPU).
        # Split mode: the prefill worker hands each request's KV to the decode worker (KV transfer panels).
        start("engine", [sys.executable, "-m", "phaselens", "serve", "--preset", "tiny", "--workers", "2",
                         "--mode", "split", "--prefill", "1", "--decode", "1",
                         "--port", str(engine_port), "--shim-socket", str(sock)])
        engine = f"http://127.0.0.1:{engine_port}"
        for name, (_, port) in agents.items():
            url = f"http://127.0.0.1:{port}/metrics"
            _wait_for(f"{name} /metrics", lambda: _get(url)[0] == 200, 60, procs)  # noqa: B023 - called now
        if agent_kind == "agent":
            _wait_for("the agent's phase socket", sock.exists, 30, procs)
            # One bad datagram, as a broken shim would send: the agent must count it (by reason) and go on.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bad:
                bad.sendto(b'{"type": "step", "gpu_uuid": 7}', str(sock))
        _wait_for("engine /health", lambda: _get(f"{engine}/health")[0] == 200, 120, procs)
        loader = threading.Thread(target=_load, args=(engine, stop), daemon=True)
        loader.start()

        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(tmp / "rules.yaml")],
            "scrape_configs": [
                {"job_name": "phaselens-agent",
                 "static_configs": [{"targets": [f"127.0.0.1:{port}" for _, port in agents.values()]}]},
                {"job_name": "phaselens-engine",
                 "static_configs": [{"targets": [f"127.0.0.1:{engine_port}"]}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(tmp / "prometheus.yml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        start("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"])
        prom = f"http://127.0.0.1:{prom_port}"
        s = Stack(prom, [f"http://127.0.0.1:{port}/metrics" for _, port in agents.values()], engine,
                  agent_kind, time.monotonic(), procs)

        def all_up() -> bool:
            return [r["value"][1] for r in s.query('up{job=~"phaselens-.*"}')] == ["1"] * (len(agents) + 1)

        _wait_for("every scrape target up", all_up, 60, procs)
        yield s
    finally:
        stop.set()
        if loader is not None:
            loader.join(timeout=35)
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for log in logs:
            log.close()


def _all_queries() -> list[PanelQuery]:
    return [q for name, board in sorted(load_dashboards().items()) for q in panel_queries(name, board)]


@pytest.mark.parametrize("panel", _all_queries(), ids=lambda q: f"{q.dashboard}:{q.panel}:{q.ref_id}")
def test_every_dashboard_panel_returns_data(stack: Stack, panel: PanelQuery) -> None:
    expr = expand(panel.expr, rate_interval=RATE_INTERVAL)
    end = stack.started + DATA_DEADLINE_S
    result: list[dict[str, Any]] = []
    while True:
        result = stack.query(expr)
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if finite:
            return
        if time.monotonic() > end:
            break
        time.sleep(0.5)  # polling interval of a condition with a deadline
    pytest.fail(f"{panel.dashboard} / {panel.panel} / {panel.ref_id}: no finite data after "
                f"{DATA_DEADLINE_S:g} s for {expr!r} (agent: {stack.agent_kind}); got {result!r}")


def test_recording_rules_load_and_evaluate(stack: Stack) -> None:
    _, body = _get(f"{stack.prometheus}/api/v1/rules")
    groups = json.loads(body)["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    expected = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in expected:
        name = rule.get("record") or rule["alert"]
        assert name in loaded, f"{name} not loaded"
        assert loaded[name]["health"] == "ok", (name, loaded[name].get("lastError"))
    end = stack.started + DATA_DEADLINE_S
    for rule in expected:
        if "record" not in rule:
            continue
        while not stack.query(rule["record"]):
            assert time.monotonic() < end, f"recording rule {rule['record']} produced no series"
            time.sleep(0.5)  # polling interval of a condition with a deadline


def test_promtool_check_metrics_on_live_endpoints(stack: Stack) -> None:
    for url in [*stack.agent_metrics, f"{stack.engine}/metrics"]:
        status, body = _get(url)
        assert status == 200, url
        proc = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            url, proc.stdout.decode() + proc.stderr.decode())


def test_the_engines_steps_reach_the_agent(stack: Stack) -> None:
    if stack.agent_kind != "agent":
        pytest.skip("the stand-in harness has no phase receiver "
                    "(phaselens agent absent, or PHASELENS_LIVE_AGENT=harness)")
    end = stack.started + DATA_DEADLINE_S
    while True:
        got = {r["metric"].get("reason", "received"): float(r["value"][1]) for r in stack.query(
            "phaselens_shim_events_received_total > 0 or phaselens_shim_events_rejected_total > 0")}
        if "received" in got and got.keys() - {"received"}:
            break
        assert time.monotonic() < end, f"shim events seen by Prometheus: {got}"
        time.sleep(0.5)  # polling interval of a condition with a deadline
    # and the engine's GPU appears with attributed phase time
    assert stack.query('phaselens_phase_time_ratio{gpu_uuid="GPU-sim-0"}')


def test_preview_png_from_the_test_prometheus(stack: Stack, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "phase_split.png"
    end = stack.started + DATA_DEADLINE_S
    runner = CliRunner()
    while True:
        result = runner.invoke(cli, ["dashboards", "preview", "--prometheus", stack.prometheus,
                                     "--range", "5m", "--out", str(out)])
        if result.exit_code == 0 or time.monotonic() > end:
            break
        time.sleep(0.5)  # polling interval of a condition with a deadline
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] >= 300 and image.shape[1] >= 800
    # 2 phases x 2 metrics drawn
    assert "(4 series)" in result.output
    keep = os.environ.get("PHASELENS_PREVIEW_OUT")
    if keep:  # lets a developer look at the picture: PHASELENS_PREVIEW_OUT=/tmp/x.png pytest ...
        shutil.copy(out, keep)
