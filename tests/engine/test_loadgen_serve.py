"""`phaselens load` against `phaselens serve --preset tiny` (CPU, two worker processes): a 200-request run
completes, and the client's TTFT/TPOT agree with the server's own histograms and request log."""

from __future__ import annotations

import json
import sys

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from phaselens.engine.loadgen_cli import load
from phaselens.engine.request_log import read_request_log
from tests.engine.server_harness import LiveServer, fake_workers, free_port, running_process, wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log_path = tmp / "requests.jsonl"
    cmd = [sys.executable, "-m", "phaselens", "serve", "--preset", "tiny", "--workers", "2",
           "--port", str(port), "--request-log", str(log_path), "--no-shim", "--num-kv-blocks", "512"]
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, f"{url}/health", "phaselens serve"):
        yield url, log_path


def _histogram(text: str, name: str) -> tuple[list[float], list[float]]:
    """(upper bounds, cumulative counts) of an unlabelled-by-us histogram, summed over its series."""
    cum: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                cum[le] = cum.get(le, 0.0) + s.value
    bounds = sorted(cum)
    return bounds, [cum[b] for b in bounds]


def _bucket(bounds: list[float], value: float) -> int:
    return next(i for i, b in enumerate(bounds) if value <= b)


def _assert_same_bucket_within_one(client: list[float], bounds: list[float], cum: list[float],
                                   what: str) -> None:
    n = cum[-1]
    assert n == len(client), f"{what}: server counted {n}, client {len(client)}"
    for q in (0.5, 0.9):
        server_k = next(i for i, c in enumerate(cum) if c >= q * n)
        client_v = float(np.percentile(client, q * 100, method="inverted_cdf"))
        client_k = _bucket(bounds, client_v)
        assert abs(client_k - server_k) <= 1, (f"{what} p{q * 100:g}: client {client_v * 1e3:.1f} ms, "
                                               f"bucket <= {bounds[client_k]}; server <= {bounds[server_k]}")


def test_load_run_of_200_requests_agrees_with_the_server(served, tmp_path) -> None:
    url, log_path = served
    out = tmp_path / "load.json"
    args = ["--url", url, "-n", "200", "--rate", "20", "--seed", "1", "--prompt-median", "40",
            "--prompt-max", "300", "--output-median", "12", "--output-min", "2", "--output-max", "40",
            "--turns", "2", "--shared-prefix", "32", "--slo-ttft", "1.0", "--slo-tpot", "0.2",
            "--json", str(out), "--no-progress"]
    result = CliRunner().invoke(load, args)
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output and "goodput" in result.output
    doc = json.loads(out.read_text())
    summary, reqs = doc["summary"], doc["requests"]
    assert summary["completed"] == 200 and summary["failed"] == 0, summary["errors"]
    assert summary["cached_tokens"] > 0  # the shared prefix and the earlier turns come from the cache
    assert 0 < summary["slo"]["attainment"] <= 1 and summary["output_token_throughput"] > 0

    text = httpx.get(f"{url}/metrics").text
    bounds, cum = _histogram(text, "phaselens_engine_time_to_first_token_seconds")
    _assert_same_bucket_within_one([r["ttft_s"] for r in reqs], bounds, cum, "TTFT")
    bounds, cum = _histogram(text, "phaselens_engine_time_per_output_token_seconds")
    tpots = [r["tpot_s"] for r in reqs if r["tpot_s"] is not None]
    _assert_same_bucket_within_one(tpots, bounds, cum, "TPOT")

    # request by request, against the server's request log: the client's TTFT only adds the HTTP round trip
    wait_for(lambda: len(read_request_log(log_path)) >= 200, what="200 request-log lines")
    records = {r["request_id"]: r for r in read_request_log(log_path)}
    diffs = []
    for r in reqs:
        rec = records[r["request_id"]]
        assert rec["status"] == "ok" and rec["output_tokens"] == r["output_tokens"]
        assert rec["prompt_tokens"] == r["prompt_tokens"] and rec["cached_tokens"] == r["cached_tokens"]
        assert rec["session_id"] == f"s{r['session']}"
        diffs.append(r["ttft_s"] - (rec["first_token_ns"] - rec["arrival_ns"]) / 1e9)
    print(f"client - server TTFT: min {min(diffs) * 1e3:.2f} ms, median {np.median(diffs) * 1e3:.2f} ms,"
          f" max {max(diffs) * 1e3:.2f} ms")
    assert min(diffs) > -0.002 and float(np.median(diffs)) < 0.05


_SMALL = ["-n", "3", "--rate", "inf", "--prompt-median", "8", "--prompt-max", "16", "--output-median", "2",
          "--output-max", "3", "--no-progress"]


@pytest.fixture(scope="module")
def fake_served():
    with LiveServer(fake_workers(1)) as srv:
        yield srv.url


def test_load_fails_and_shows_the_server_message_when_every_request_failed(fake_served, tmp_path) -> None:
    out = tmp_path / "load.json"
    result = CliRunner().invoke(load, ["--url", fake_served, "--model", "nope", "--json", str(out), *_SMALL])
    assert result.exit_code == 1, result.output
    assert "every request failed" in result.output and "the model 'nope' does not exist" in result.output
    assert json.loads(out.read_text())["summary"]["failed"] == 3  # the record is written all the same


def test_load_keeps_its_results_when_the_json_file_cannot_be_written_at_the_end(fake_served, tmp_path,
                                                                                monkeypatch) -> None:
    out = tmp_path / "load.json"

    def fail(*args: object, **kw: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", fail)  # the path was fine at start-up, the disk fills
    result = CliRunner().invoke(load, ["--url", fake_served, "--json", str(out), *_SMALL])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    doc = json.loads(next(ln for ln in result.output.splitlines() if ln.startswith('{"spec"')))
    assert doc["summary"]["completed"] == 3
