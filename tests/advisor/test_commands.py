"""``phaselens advise``: report outputs on generated fixtures, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from phaselens.cli import cli

from .synth import synth_steps, write_request_log, write_trace


@pytest.fixture
def inputs(tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", synth_steps(n_mixed=20))
    rng = np.random.default_rng(0)
    log = write_request_log(
        tmp_path / "requests.jsonl", rng.integers(200, 3000, 300), rng.integers(20, 300, 300), rate=8.0
    )
    return tmp_path, trace, log


def run(*args: str):
    return CliRunner().invoke(cli, ["advise", *args], catch_exceptions=False)


BASE = (
    "--preset",
    "llama-3.1-8b",
    "--gpus",
    "8",
    "--ttft-ms",
    "1000",
    "--tpot-ms",
    "40",
    "--tp",
    "1",
    "--tp",
    "2",
    "--seeds",
    "1",
    "--requests",
    "300",
)


def test_report_terminal_html_json_and_metrics(inputs):
    tmp, trace, log = inputs
    html = tmp / "report.html"
    metrics = tmp / "advisor.prom"
    res = run(
        "--trace",
        str(trace),
        "--request-log",
        str(log),
        *BASE,
        "--html",
        str(html),
        "--metrics-file",
        str(metrics),
    )
    assert res.exit_code == 0, res.output
    out = res.output
    assert "verdict:" in out and "held-out mean relative error" in out and "rule:" in out
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "GPU time share by phase" in page
    # self-contained: inline SVG, nothing fetched
    assert "<script" not in page and "src=" not in page and "href=" not in page
    text = metrics.read_text()
    assert 'phaselens_advisor_goodput_gain_ratio{model_name="llama-3.1-8b"}' in text
    assert "phaselens_advisor_recommended_gpus{" in text

    res = run("--trace", str(trace), "--request-log", str(log), *BASE, "--html", "", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["verdict"] in ("split", "colocated", "conditional")
    assert doc["inputs"]["step_model"]["holdout_mean_relative_error"]["prefill"] < 0.05
    assert {r["code"] for r in doc["reasons"]} >= {
        "short_prompts",
        "prefix_reuse_decode_side",
        "slow_kv_link",
    }


def test_roofline_without_trace_is_flagged(inputs):
    tmp, _, log = inputs
    res = run("--request-log", str(log), "--gpu", "NVIDIA H100 80GB HBM3", *BASE, "--html", "", "--json")
    assert res.exit_code == 0, res.output
    assert any("roofline" in n for n in json.loads(res.output)["notes"])


def bad(*args: str) -> str:
    res = CliRunner().invoke(cli, ["advise", *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


def test_empty_and_short_traces(inputs):
    tmp, _, log = inputs
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    out = bad("--trace", str(empty), "--request-log", str(log), "--gpu", "NVIDIA H100 80GB HBM3", *BASE)
    assert "not enough steps to fit: 0, need 12" in out
    short = write_trace(tmp / "short.jsonl", synth_steps(n_prefill=5, n_decode=40))
    out = bad("--trace", str(short), "--request-log", str(log), *BASE)
    assert "not enough steps to fit: 5, need 12" in out


def test_bad_values_are_named(inputs):
    tmp, trace, log = inputs
    common = ("--trace", str(trace), "--request-log", str(log), "--preset", "llama-3.1-8b")
    slo = ("--ttft-ms", "1000", "--tpot-ms", "40")
    assert "0 (need at least 1 GPU)" in bad(*common, "--gpus", "0", *slo)
    assert "unknown GPU 'NVIDIA Z9000'" in bad(*common, "--gpus", "4", "--gpu", "NVIDIA Z9000", *slo)
    assert "inconsistent SLOs" in bad(*common, "--gpus", "4", "--ttft-ms", "1", "--tpot-ms", "1000")
    assert "must be a positive number" in bad(*common, "--gpus", "4", "--ttft-ms", "-5", "--tpot-ms", "40")
    assert "percentile" in bad(*common, "--gpus", "4", *slo, "--ttft-pct", "150")
    assert "unknown preset 'llama-9'" in bad(
        "--trace", str(trace), "--request-log", str(log), "--preset", "llama-9", "--gpus", "4", *slo
    )
    assert "exactly one workload source" in bad(
        "--trace", str(trace), "--preset", "tiny", "--gpus", "4", *slo
    )
    assert "rate='abc' is not a number" in bad(
        "--trace",
        str(trace),
        "--workload",
        "rate=abc,prompt=fixed:5,output=fixed:5",
        "--preset",
        "tiny",
        "--gpus",
        "4",
        *slo,
    )
    assert "--apply needs --engine" in bad(*common, "--gpus", "4", *slo, "--apply")
    # values the cluster checks are named with the option that carried them
    assert "Invalid value for --kv-link-gbps: KV link bandwidth must be > 0" in bad(
        *common, "--gpus", "4", *slo, "--kv-link-gbps", "0")
    assert "Invalid value for --price" in bad(*common, "--gpus", "4", *slo, "--price", "-1")
    assert "Invalid value for --ttft-pct" in bad(*common, "--gpus", "4", *slo, "--ttft-pct", "150")
    out = bad(*common, "--gpus", "4", *slo, "--tp", "3")
    assert "Invalid value for --tp: TP degree 3 does not fit model 'llama-3.1-8b'" in out
    assert "32 attention heads do not divide over 3 GPUs" in out


def test_slo_no_configuration_can_meet_is_inconsistent(inputs):
    tmp, trace, log = inputs
    out = bad(
        "--trace",
        str(trace),
        "--request-log",
        str(log),
        "--preset",
        "llama-3.1-8b",
        "--gpus",
        "4",
        "--ttft-ms",
        "5",
        "--tpot-ms",
        "2",
        "--tp",
        "1",
    )
    assert "inconsistent SLOs for this workload" in out


def test_ttft_overhead_estimated_from_the_request_log(tmp_path):
    from phaselens.advisor.commands import estimate_ttft_overhead
    from phaselens.advisor.step_model import StepModel
    from phaselens.advisor.workload import Workload

    model = StepModel.fit(synth_steps())
    co = model.coefficients(1)
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 2000, 200)
    log = write_request_log(tmp_path / "r.jsonl", prompt, [50] * 200, rate=2.0)
    # rewrite first-token times: 30 ms outside the steps + the prefill + some queueing
    lines = []
    for line, p in zip(log.read_text().splitlines(), prompt):
        rec = json.loads(line)
        wait = float(rng.exponential(0.02)) if rng.random() < 0.5 else 0.0
        ttft = 0.030 + co.prefill_time(float(p), float(p) ** 2) + wait
        rec["first_token_ns"] = rec["arrival_ns"] + int(ttft * 1e9)
        lines.append(json.dumps(rec))
    log.write_text("\n".join(lines) + "\n")
    overhead = estimate_ttft_overhead(model, Workload.from_request_log(log), 1)
    assert overhead == pytest.approx(0.030, abs=0.004)


def test_html_shows_agent_attribution_from_a_recorded_h100_trace(tmp_path):
    """A `phaselens record`-style trace (steps + GPM samples from the H100) gives the two lines."""
    from pathlib import Path

    from phaselens.advisor.report import phase_utilization_over_time
    from phaselens.trace import read_trace

    trace = Path(__file__).parents[1] / "fixtures" / "attribution" / "regime_8b.jsonl"
    tr = read_trace(trace)
    util = phase_utilization_over_time(tr.steps, tr.samples)
    pre, dec = util["prefill"], util["decode"]
    assert np.isfinite(pre).sum() >= 4 and np.isfinite(dec).sum() >= 4
    # prefill keeps the SMs busier than decode on this GPU
    assert np.nanmedian(pre) > np.nanmedian(dec)
    html = tmp_path / "report.html"
    spec = "rate=5,prompt=lognormal:2000:0.5,output=lognormal:200:0.5"
    res = run("--trace", str(trace), "--workload", spec, *BASE, "--html", str(html))
    assert res.exit_code == 0, res.output
    assert "SM active while each phase runs (agent attribution, unmix)" in html.read_text()
