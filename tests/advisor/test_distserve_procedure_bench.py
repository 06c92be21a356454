"""The replay of DistServe's own search procedure (bench/distserve_procedure.py): its simulation rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.bench_module import load_bench

bench = load_bench("distserve_procedure")
REFERENCE = json.loads(bench.REFERENCE.read_text())


@pytest.fixture(scope="module")
def tp2():
    return bench.PublishedSteps(REFERENCE, 2)


def test_step_times_are_the_published_lines_plus_the_snapshot_extras(tp2):
    a, b, c = REFERENCE["coefficients_ms"]["2"]["prefill"]
    assert tp2.prefill_ms([1000]) == pytest.approx(a + 3.0 + (b + 1e-4) * 1000 + c * 1000**2)
    a, b, c = REFERENCE["coefficients_ms"]["2"]["decode_large"]
    # the large-batch line from batch 95 (the knee) on
    assert tp2.decode_ms([500] * 95) == pytest.approx(a + 2.0 + (b + 1e-4) * 500 * 95 + c * 95)


def test_lone_request_ttft_is_its_prefill_and_tpot_its_decode_steps(tp2):
    ttft, tpot = bench.simulate([(800, 3)], np.array([0.0]), tp2, tp2, decode_cap=50_000)
    assert ttft[0] == pytest.approx(tp2.prefill_ms([800]))
    steps = [tp2.decode_ms([800 + g + 1]) for g in range(3)]
    assert tpot[0] == pytest.approx(sum(steps) / 3)


def test_queued_prompts_share_one_prefill_step(tp2):
    # the second and third arrive while the first prefills: one step takes both
    ttft, _ = bench.simulate([(1000, 1), (100, 1), (100, 1)], np.array([0.0, 1.0, 2.0]), tp2, tp2, 50_000)
    first = tp2.prefill_ms([1000])
    assert ttft[1] == pytest.approx(first + tp2.prefill_ms([100, 100]) - 1.0)
    assert ttft[2] == pytest.approx(ttft[1] - 1.0)


def test_decode_cap_holds_requests_back_in_order(tp2):
    # two 600-token contexts do not fit a 1,000-token cap together: the second waits a step
    _, tpot = bench.simulate([(600, 1), (600, 1)], np.array([0.0, 0.0]), tp2, tp2, decode_cap=1000)
    one = tp2.decode_ms([601])
    assert tpot[0] == pytest.approx(one) and tpot[1] == pytest.approx(2 * one)


def test_bisection_reports_a_lower_bracket_end_on_the_search_grid():
    sample = [tuple(p) for p in json.loads(bench.WORKLOAD.read_text())["prompt_output"]]
    found = bench.bisect(0, REFERENCE, sample, decode_tp=1, n=100)
    # [0, 5] halved until under 0.25 wide: lower ends are multiples of 5/32
    assert found > 0 and (found / (5 / 32)) == pytest.approx(round(found / (5 / 32)))
