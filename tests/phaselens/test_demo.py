"""`phaselens demo --quick` end to end on CPU: real agent (simulated source), engine, load and advisor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phaselens.trace import read_trace


@pytest.mark.slow
def test_demo_quick_prints_the_split_and_a_verdict(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "phaselens", "demo", "--quick", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SIMULATED source" in run.stdout
    assert "blended vs per phase" in run.stdout
    report = json.loads((out / "demo.json").read_text())
    assert report["plan"]["source"] == "simulated" and report["plan"]["preset"] == "tiny"
    gpu = report["split"]["GPU-sim-0"]
    # the point of the product: the blended value hides two very different phases
    assert {"prefill", "decode"} <= set(gpu["phases"])
    prefill, decode = gpu["phases"]["prefill"], gpu["phases"]["decode"]
    assert prefill["tensor_active"] > decode["tensor_active"] + 0.3
    assert decode["dram_active"] > prefill["dram_active"] + 0.3
    assert 0 < gpu["blended"]["tensor_active"] < prefill["tensor_active"]
    assert report["advice"]["verdict"] in ("colocated", "split", "conditional")
    assert report["advice"]["verdict"].upper() in run.stdout
    # what ruled the other verdicts out is printed with the verdict
    for why in report["advice"]["not_recommended_because"][:3]:
        assert f"not recommended: {why}" in run.stdout
    assert report["load"]["completed"] == 60 and report["load"]["failed"] == 0
    assert (out / "report.html").stat().st_size > 10_000
    trace = read_trace(out / "trace.jsonl")
    assert trace.steps and trace.samples and trace.malformed == 0
    assert {s.source for s in trace.samples} == {"simulated"}


def test_demo_rejects_bad_values() -> None:
    from click.testing import CliRunner

    from phaselens.demo import demo

    result = CliRunner().invoke(demo, ["--preset", "llama-9"])
    assert result.exit_code == 2 and "'llama-9'" in result.output
    result = CliRunner().invoke(demo, ["--device", "tpu"])
    assert result.exit_code == 2 and "'tpu'" in result.output
