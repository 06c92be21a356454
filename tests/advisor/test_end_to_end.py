"""End to end on CPU: ``phaselens serve --preset tiny`` with a request log and step records,
``phaselens load`` against it, then ``phaselens advise`` on what they wrote: terminal report and
report.html."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from phaselens.cli import cli
from phaselens.trace import read_trace
from tests.engine.server_harness import free_port, running_process


@pytest.fixture(scope="module")
def served_and_loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    log_path = tmp / "requests.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "phaselens",
        "serve",
        "--preset",
        "tiny",
        "--workers",
        "1",
        "--port",
        str(port),
        "--request-log",
        str(log_path),
        "--shim-jsonl",
        str(tmp / "steps-{worker}.jsonl"),
        "--shim-socket",
        str(tmp / "nobody.sock"),
        "--num-kv-blocks",
        "512",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, f"{url}/health", "phaselens serve"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "phaselens",
                "load",
                "--url",
                url,
                "-n",
                "120",
                "--rate",
                "8",
                "--prompt-median",
                "200",
                "--prompt-max",
                "1200",
                "--output-median",
                "24",
                "--output-max",
                "64",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    traces = sorted(tmp.glob("steps-*.jsonl"))
    assert traces, list(tmp.iterdir())
    return tmp, log_path, traces


def test_advise_from_serve_and_load(served_and_loaded, monkeypatch):
    tmp, log_path, traces = served_and_loaded
    assert sum(len(read_trace(t).steps) for t in traces) > 100
    monkeypatch.chdir(tmp)
    args = [
        "advise",
        *sum((["--trace", str(t)] for t in traces), []),
        "--request-log",
        str(log_path),
        "--preset",
        "tiny",
        "--gpu",
        "NVIDIA H100 80GB HBM3",
        "--gpus",
        "4",
        "--gpus-per-node",
        "4",
        "--ttft-ms",
        "500",
        "--tpot-ms",
        "50",
        "--seeds",
        "1",
        "--requests",
        "300",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "verdict:" in res.output and "held-out mean relative error" in res.output
    assert "host clock" in res.output  # CPU steps are flagged
    print(res.output)
    page = (tmp / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "phaselens advise" in page
