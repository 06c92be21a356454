"""The load generator's workload and statistics, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from phaselens.engine.loadgen import (LengthDist, RequestResult, WorkloadSpec, arrival_gaps, build_workload,
                                      percentiles, read_lengths, summarize)
from phaselens.engine.loadgen_cli import load


def test_lengths_are_seeded_clipped_lognormals() -> None:
    d = LengthDist(median=98, sigma=1.0, lo=4, hi=2048)
    a, b = d.sample(np.random.default_rng(7), 20000), d.sample(np.random.default_rng(7), 20000)
    assert (a == b).all() and a.min() >= 4 and a.max() <= 2048
    assert abs(np.median(a) - 98) / 98 < 0.05
    narrow = LengthDist(50, 2.0, 10, 20).sample(np.random.default_rng(0), 1000)
    assert set(narrow.tolist()) >= {10, 20} and narrow.min() == 10 and narrow.max() == 20
    with pytest.raises(ValueError, match="median"):
        LengthDist(0, 1, 1, 2)


def test_arrivals_poisson_rate_and_gamma_burstiness() -> None:
    rng = np.random.default_rng(1)
    poisson = arrival_gaps(rng, 40000, rate=20.0)
    assert abs(poisson.mean() - 1 / 20) / (1 / 20) < 0.03
    assert abs(poisson.std() / poisson.mean() - 1.0) < 0.05  # exponential gaps: CV 1
    bursty = arrival_gaps(rng, 40000, rate=20.0, burstiness=0.25)
    assert abs(bursty.mean() - 1 / 20) / (1 / 20) < 0.05
    assert abs(bursty.std() / bursty.mean() - 2.0) < 0.1  # Gamma(k): CV 1/sqrt(k)
    assert (arrival_gaps(rng, 5, rate=float("inf")) == 0).all()
    with pytest.raises(ValueError, match="rate"):
        arrival_gaps(rng, 5, rate=0)


def test_sessions_extend_the_previous_prompt_and_share_the_prefix() -> None:
    spec = WorkloadSpec(num_requests=7, rate=5, seed=3, turns=3, shared_prefix=16, think_time_s=0.5,
                        prompt=LengthDist(20, 0.5, 5, 40), output=LengthDist(10, 0.5, 2, 20))
    reqs = build_workload(spec)
    assert reqs == build_workload(spec) and len(reqs) == 7
    assert [(r.session, r.turn) for r in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    prefix = reqs[0].prompt[:16]
    assert all(r.prompt[:16] == prefix for r in reqs)
    for prev, cur in zip(reqs, reqs[1:]):
        if cur.session == prev.session:
            assert cur.prompt[:len(prev.prompt)] == prev.prompt
            assert len(cur.prompt) > len(prev.prompt) + prev.max_tokens
            assert cur.offset_s == prev.offset_s and cur.think_s > 0
    assert reqs[0].offset_s == 0 and reqs[3].offset_s > 0
    assert all(32 <= t < 127 for r in reqs for t in r.prompt)


def test_lengths_file(tmp_path) -> None:
    path = tmp_path / "lengths.jsonl"
    path.write_text('{"prompt_tokens": 5, "output_tokens": 2}\n\n{"prompt_tokens": 9, "output_tokens": 1}\n')
    pairs = read_lengths(path)
    reqs = build_workload(WorkloadSpec(num_requests=3, lengths=tuple(pairs)))
    assert [(len(r.prompt), r.max_tokens) for r in reqs] == [(5, 2), (9, 1), (5, 2)]
    path.write_text('{"prompt_tokens": 5, "output_tokens": 2}\n{"prompt_tokens": "5"}\n')
    with pytest.raises(ValueError, match=r"lengths.jsonl:2"):
        read_lengths(path)


def _res(i: int, ok: bool, ttft: float | None, tpot: float | None, out: int = 10) -> RequestResult:
    e2e = (ttft or 0) + (tpot or 0) * (out - 1) if ok else None
    return RequestResult(index=i, session=i, turn=0, request_id=f"r{i}", ok=ok,
                         status_code=200 if ok else 503, error=None if ok else "HTTP 503: full", start_ns=0,
                         prompt_tokens=5, output_tokens=out if ok else 0, cached_tokens=0, ttft_s=ttft,
                         tpot_s=tpot, e2e_s=e2e, itl_s=[tpot or 0] * (out - 1))


def test_summary_percentiles_slo_attainment_and_goodput() -> None:
    results = [_res(0, True, 0.1, 0.01), _res(1, True, 0.3, 0.01), _res(2, True, 0.1, 0.05),
               _res(3, False, None, None)]
    s = summarize(results, duration_s=2.0, slo_ttft_s=0.2, slo_tpot_s=0.02)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1) and s["errors"] == {"HTTP 503": 1}
    assert s["slo"]["attainment"] == 0.25 and s["slo"]["goodput_rps"] == 0.5  # only request 0 meets both
    assert s["request_throughput"] == 1.5 and s["output_token_throughput"] == 15.0
    assert s["ttft_s"]["p50"] == pytest.approx(0.1) and s["ttft_s"]["mean"] == pytest.approx(0.5 / 3)
    assert percentiles([1.0, 2.0, 3.0, 4.0])["p50"] == 2.5 and percentiles([])["p99"] is None


@pytest.mark.parametrize("args,needle", [
    (["--rate", "0"], "--rate"),
    (["--rate", "fast"], "'fast' is not a number"),
    (["--prompt-min", "50", "--prompt-max", "10"], "--prompt-min 50 > --prompt-max 10"),
    (["-n", "0"], "--num-requests"),
    (["--url", "http://127.0.0.1:9"], "cannot reach"),
])
def test_load_cli_rejects_bad_input_without_a_traceback(args, needle) -> None:
    result = CliRunner().invoke(load, args)
    assert result.exit_code in (1, 2) and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_load_cli_names_the_bad_line_of_a_lengths_file(tmp_path) -> None:
    bad = tmp_path / "l.jsonl"
    bad.write_text(json.dumps({"prompt_tokens": 0, "output_tokens": 1}) + "\n")
    result = CliRunner().invoke(load, ["--lengths", str(bad)])
    assert result.exit_code == 2 and "l.jsonl:1" in result.output


def test_load_cli_rejects_a_bad_url_up_front() -> None:
    for url in ("bogus", "127.0.0.1:8000", "ftp://host/"):
        result = CliRunner().invoke(load, ["--url", url, "-n", "1"])
        assert result.exit_code == 2 and "--url" in result.output, result.output


def test_load_cli_checks_the_json_path_before_the_run(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    # the server is not even reachable: the bad path is found first, not after a whole run
    result = CliRunner().invoke(load, ["--url", "http://127.0.0.1:9", "-n", "1",
                                       "--json", str(tmp_path / "afile" / "out.json")])
    assert result.exit_code == 2 and "--json" in result.output, result.output
    good = tmp_path / "out.json"
    result = CliRunner().invoke(load, ["--url", "http://127.0.0.1:9", "-n", "1", "--json", str(good)])
    assert result.exit_code == 1 and "cannot reach" in result.output
    assert not good.exists()  # the check leaves nothing behind
