"""Workload sources: spec, request log (with sessions), Prometheus range queries."""

from __future__ import annotations

import numpy as np
import pytest

from phaselens.advisor.workload import Workload, WorkloadError

from .synth import write_request_log


def test_spec_lengths_and_prefix_split():
    wl = Workload.from_spec("rate=4,prompt=lognormal:800:0.5,output=fixed:200,prefix_hit=0.5,multi_turn=0.5")
    assert wl.rate == 4 and wl.n > 1000
    assert wl.prompt_tokens.mean() == pytest.approx(800, rel=0.05)
    assert (wl.output_tokens == 200).all()
    # split recomputes session history: more prompt tokens than colocated
    assert wl.effective_prompt(True).mean() > wl.effective_prompt(False).mean()
    assert 0 < wl.history_share < 1


@pytest.mark.parametrize(
    "spec, bad",
    [
        ("rate=0,prompt=fixed:10,output=fixed:10", "rate"),
        ("rate=1,prompt=fixed:0,output=fixed:10", "prompt"),
        ("rate=1,prompt=gauss:3,output=fixed:10", "gauss:3"),
        ("rate=1,output=fixed:10", "prompt"),
        ("rate=1,prompt=fixed:10,output=fixed:10,colour=blue", "colour"),
        ("rate=1,prompt=fixed:10,output=fixed:10,prefix_hit=2", "prefix_hit"),
    ],
)
def test_bad_spec_names_the_value(spec, bad):
    with pytest.raises(WorkloadError, match=bad):
        Workload.from_spec(spec)


def test_request_log_rate_lengths_and_sessions(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 1000, n)
    output = rng.integers(10, 200, n)
    cached = [0] * n
    sessions = [None] * n
    for i in range(0, n, 2):  # every other request continues session s<i-1>
        sessions[i] = f"s{i}"
        if i + 1 < n:
            sessions[i + 1] = f"s{i}"
            cached[i + 1] = 50
    path = write_request_log(
        tmp_path / "req.jsonl", prompt, output, rate=5.0, cached=cached, sessions=sessions
    )
    with path.open("a") as f:
        f.write("not json\n")
        f.write('{"type":"request","status":"error","prompt_tokens":5}\n')
    wl = Workload.from_request_log(path)
    assert wl.n == n
    assert wl.rate == pytest.approx(5.0, rel=0.15)
    assert wl.burstiness == pytest.approx(1.0, rel=0.3)
    assert wl.history_cached.sum() == 50 * (n // 2) and wl.static_cached.sum() == 0


def test_request_log_errors(tmp_path):
    with pytest.raises(WorkloadError, match="does not exist"):
        Workload.from_request_log(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(WorkloadError, match="has 0 finished requests"):
        Workload.from_request_log(empty)


def test_prometheus_range_query_through_the_seam():
    calls = []
    values = {"rate": 2.0, "prefill": 2.0 * 900, "decode": 2.0 * 150}

    def get(url, params):
        calls.append((url, params["query"]))
        key = (
            "rate"
            if "time_to_first_token" in params["query"]
            else "prefill" if 'kind="prefill"' in params["query"] else "decode"
        )
        return {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [{"metric": {}, "values": [[1.0, str(values[key])], [2.0, str(values[key])]]}],
            },
        }

    wl = Workload.from_prometheus("http://prom:9090", 0.0, 3600.0, get=get)
    assert all(u == "http://prom:9090/api/v1/query_range" for u, _ in calls)
    assert any("phaselens_engine_time_to_first_token_seconds_count" in q for _, q in calls)
    assert wl.rate == pytest.approx(2.0)
    assert wl.prompt_tokens.mean() == pytest.approx(900, rel=0.1)
    assert wl.output_tokens.mean() == pytest.approx(150, rel=0.1)
    assert any("assumed" in n for n in wl.notes)


def test_prometheus_without_data_is_a_clear_error():
    def get(url, params):
        return {"status": "success", "data": {"resultType": "matrix", "result": []}}

    with pytest.raises(WorkloadError, match="no data"):
        Workload.from_prometheus("http://prom:9090", 0.0, 60.0, get=get)
