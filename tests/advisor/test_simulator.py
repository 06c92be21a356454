"""The simulator against the closed form where the closed form is exact, and its reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.screen import Placement, Screen, erlang_c
from phaselens.advisor.simulator import Simulator
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import Workload
from phaselens.engine.config import preset
from phaselens.gpus import gpu_spec

PROMPT = 1024
# prefill of a 1024-token prompt: 10 ms + 1024 * 40 us = 50.96 ms (deterministic service: M/D/1)
TABLE = {1: {"prefill": [0.010, 4.0e-5, 0.0], "decode": [0.008, 1.0e-8, 1.0e-4]}}


@pytest.fixture
def setup():
    model = StepModel.from_table(TABLE)
    wl = Workload.from_arrays(1.0, [PROMPT] * 10, [64] * 10)
    slo = Slo(ttft_s=10.0, tpot_s=1.0)
    cluster = Cluster(
        gpus=2,
        gpu=gpu_spec("NVIDIA H100 80GB HBM3"),
        model=preset("llama-3.1-8b"),
        kv_link_gbps=1e6,
        tp_degrees=(1,),
    )
    return model, wl, slo, cluster


def test_md1_prefill_queue_matches_pollaczek_khinchine(setup):
    model, wl, slo, cluster = setup
    service = 0.010 + 4.0e-5 * PROMPT
    rate = 0.3 / service  # utilisation 0.3: light load
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    means = []
    for seed in range(3):
        sim = Simulator(model, wl, slo, cluster, pl, n_requests=4000, seed=seed, prefill_max_batch=1)
        means.append(float(np.mean(sim.run(rate).ttft)))
    simulated = float(np.mean(means))
    closed = Screen(model, wl, slo, cluster).prefill_mean_ttft(1, rate)
    # M/D/1: W = rho * D / (2 (1 - rho)); TTFT = W + D
    assert closed == pytest.approx(service + 0.3 * service / (2 * 0.7), rel=1e-9)
    assert simulated == pytest.approx(closed, rel=0.05)


def test_light_load_decode_step_matches_littles_law(setup):
    model, wl, slo, cluster = setup
    rate = 2.0
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    res = Simulator(model, wl, slo, cluster, pl, n_requests=3000, seed=0, prefill_max_batch=1).run(rate)
    details = Screen(model, wl, slo, cluster).decode_eval(1, rate, local=None, chunk=None)[2]
    # the mean decode step (ITL weighted per step) against the Little's-law fixed point
    steps = res.step_s
    assert float(np.mean(steps)) == pytest.approx(details["step_s"], rel=0.05)
    assert float(np.nanmean(res.tpot)) == pytest.approx(details["tpot_mean_s"], rel=0.05)


def test_same_seed_same_result_other_seed_differs(setup):
    model, wl, slo, cluster = setup
    wl = Workload.from_spec("rate=5,prompt=lognormal:800:0.8,output=lognormal:100:0.7")
    pl = Placement("colocated", n_d=2, tp_d=1, chunk=512)
    a = Simulator(model, wl, slo, cluster, pl, n_requests=400, seed=7).run(6.0)
    b = Simulator(model, wl, slo, cluster, pl, n_requests=400, seed=7).run(6.0)
    c = Simulator(model, wl, slo, cluster, pl, n_requests=400, seed=8).run(6.0)
    np.testing.assert_array_equal(a.ttft, b.ttft)
    np.testing.assert_array_equal(a.tpot, b.tpot)
    assert not np.array_equal(a.ttft, c.ttft)
    assert a.finished == a.total == 400


def test_overload_misses_the_slo(setup):
    model, wl, _, cluster = setup
    slo = Slo(ttft_s=0.5, tpot_s=0.05)
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    service = 0.010 + 4.0e-5 * PROMPT
    res = Simulator(model, wl, slo, cluster, pl, n_requests=500, seed=0).run(3.0 / service)
    assert not res.meets_slo
    ok = Simulator(model, wl, slo, cluster, pl, n_requests=500, seed=0).run(0.2 / service)
    assert ok.meets_slo and ok.joint_attainment > 0.95


def test_prefill_worker_chunks_prompts_at_the_engine_budget(setup):
    """With the engine's token budget fixed, a prompt longer than it takes a step per chunk, each paying
    the step's fixed time (the engine's max_num_batched_tokens holds on a prefill worker too)."""
    from dataclasses import replace

    model, _, slo, cluster = setup
    wl = Workload.from_arrays(1.0, [5000], [8])
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    whole = Simulator(model, wl, slo, cluster, pl, n_requests=1).run(0.01)
    chunked = Simulator(model, wl, slo, replace(cluster, chunk_budget=2048), pl, n_requests=1).run(0.01)
    assert whole.ttft[0] == pytest.approx(0.010 + 4.0e-5 * 5000)
    assert chunked.ttft[0] == pytest.approx(3 * 0.010 + 4.0e-5 * 5000)  # 2048 + 2048 + 904 tokens


def test_split_decode_holds_to_max_num_seqs(setup):
    """A decode worker runs at most max_num_seqs sequences; handed-off ones wait for a slot."""
    from dataclasses import replace

    model, _, slo, cluster = setup
    wl = Workload.from_arrays(1.0, [100] * 10, [200] * 10)
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    held = Simulator(model, wl, slo, replace(cluster, max_num_seqs=16), pl, n_requests=300).run(40.0)
    free = Simulator(model, wl, slo, cluster, pl, n_requests=300).run(40.0)
    assert held.step_batch.max() <= 16 < free.step_batch.max()


def test_erlang_c_known_values():
    # one server: an arrival waits with the utilisation; two servers at 1 erlang: 1/3 (Erlang B 0.2)
    assert erlang_c(1, 0.4) == pytest.approx(0.4)
    assert erlang_c(2, 1.0) == pytest.approx(1.0 / 3.0)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(4, 0.0) == 0.0


def test_prefill_pool_tail_is_between_central_queue_and_separate_queues():
    """Two prefill instances behind least-loaded routing: the screen's pooled P90 TTFT is near the simulated
    one (under it by up to ~18% at utilisation 0.7), where two separate M/G/1 queues overstate it."""
    model = StepModel.from_table(TABLE)
    prompts = np.random.default_rng(0).integers(200, 2000, 500)
    wl = Workload.from_arrays(1.0, prompts, [16] * 500)
    slo = Slo(ttft_s=10.0, tpot_s=1.0)
    cluster = Cluster(gpus=4, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"),
                      kv_link_gbps=1e6, tp_degrees=(1,))
    sc = Screen(model, wl, slo, cluster)
    pl = Placement("split", n_p=2, tp_p=1, n_d=2, tp_d=1)
    for rho, under in ((0.3, 0.05), (0.7, 0.25)):
        rate = 2 * rho / float(sc.prefill_service(1).mean())
        sim = float(np.mean([np.quantile(Simulator(model, wl, slo, cluster, pl, n_requests=4000, seed=s)
                                         .run(rate).ttft, 0.9) for s in range(3)]))
        pooled = sc.prefill_ttft(1, rate, servers=2)[0]
        separate = sc.prefill_ttft(1, rate / 2)[0]
        assert sim * (1 - under) <= pooled <= sim * 1.02
        assert separate > sim * 1.2


def test_colocated_without_chunking_batches_whole_prompts_up_to_the_step_limit(setup):
    """Without a chunk budget, waiting prompts run whole in one prefill step while their sum stays within
    the step's token limit (PREFILL_MAX_TOKENS): two queued 6,000-token prompts share one step."""
    from phaselens.advisor.simulator import PREFILL_MAX_TOKENS

    model, _, slo, cluster = setup
    prompt = 6000
    assert 2 * prompt <= PREFILL_MAX_TOKENS < 3 * prompt
    wl = Workload.from_arrays(1.0, [prompt], [1])
    pl = Placement("colocated", n_d=1, tp_d=1, chunk=0)
    # all three arrive within microseconds: the first runs alone, the other two queue behind it
    res = Simulator(model, wl, slo, cluster, pl, n_requests=3, seed=0).run(1e6)
    one = 0.010 + 4.0e-5 * prompt
    two = 0.010 + 4.0e-5 * 2 * prompt
    ttft = np.sort(res.ttft)
    assert ttft[0] == pytest.approx(one, abs=1e-4)
    assert ttft[1] == pytest.approx(one + two, abs=1e-4)
    assert ttft[2] == pytest.approx(one + two, abs=1e-4)


def test_steady_state_window_measures_only_requests_inside_it(setup):
    """With warmup_s, the result holds the requests arriving in [first + w, last - w], and the steps run
    between those times; a window with no arrival is an error, not an empty pass."""
    model, _, slo, cluster = setup
    wl = Workload.from_arrays(1.0, [PROMPT] * 10, [64] * 10)
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    rate, n, warmup = 2.0, 600, 40.0
    whole = Simulator(model, wl, slo, cluster, pl, n_requests=n, seed=3).run(rate)
    window = Simulator(model, wl, slo, cluster, pl, n_requests=n, seed=3, warmup_s=warmup).run(rate)
    # the simulator's draws for seed 3: the requests' rows, then their arrival times
    rng = np.random.default_rng(3)
    rng.integers(0, wl.n, size=n)
    arrival = wl.arrival_times(n, rate, rng)
    assert whole.total == n
    assert 0 < window.total < n
    # the same arrivals: the window's requests are those of the whole run whose arrival falls inside it
    inside = (arrival >= arrival[0] + warmup) & (arrival <= arrival[-1] - warmup)
    assert window.total == int(inside.sum())
    np.testing.assert_array_equal(window.ttft, whole.ttft[inside])
    assert 0 < len(window.step_s) < len(whole.step_s)
    with pytest.raises(ValueError, match="steady-state window"):
        Simulator(model, wl, slo, cluster, pl, n_requests=20, seed=3, warmup_s=warmup).run(rate)
    with pytest.raises(ValueError, match="warmup_s"):
        Simulator(model, wl, slo, cluster, pl, warmup_s=-1.0)


def test_busy_share_covers_the_measured_window(setup):
    """A worker's busy share is its step time inside the measured window over the window's length: at light
    load an M/D/1 prefill worker runs one step of D for each arrival of the window (give or take the one
    straddling each edge), whatever the fill before it and the long decode drain after the last arrival."""
    model, _, slo, cluster = setup
    wl = Workload.from_arrays(1.0, [PROMPT] * 10, [2000] * 10)
    service = 0.010 + 4.0e-5 * PROMPT
    pl = Placement("split", n_p=1, tp_p=1, n_d=1, tp_d=1)
    rate, n, warmup = 2.0, 400, 30.0
    res = Simulator(model, wl, slo, cluster, pl, n_requests=n, seed=5, prefill_max_batch=1,
                    warmup_s=warmup).run(rate)
    rng = np.random.default_rng(5)
    rng.integers(0, wl.n, size=n)
    arrival = wl.arrival_times(n, rate, rng)
    start, end = arrival[0] + warmup, arrival[-1] - warmup
    inside = int(((arrival >= start) & (arrival <= end)).sum())
    assert res.busy["p0"] * (end - start) == pytest.approx(inside * service, abs=2 * service)
    # the decode worker holds requests of 2,000 tokens: it never idles inside the window
    assert res.busy["d0"] == pytest.approx(1.0, abs=1e-9)


def test_search_goodput_per_gpu_does_not_depend_on_the_slice_size(setup):
    """Large placements are simulated as slices of up to MAX_SLICE_INSTANCES instances. In steady state the
    same pool ratio gives about the same goodput per GPU at any slice size (pooling helps a little); a fixed
    number of requests from an empty system rated a 4:4 slice 27% above a 1:1 one, as the bigger slice
    never left its filling phase."""
    from dataclasses import replace

    from phaselens.advisor.search import Search

    model, _, _, cluster = setup
    wl = Workload.from_spec("rate=5,prompt=lognormal:1000:0.5,output=lognormal:300:0.5")
    slo = Slo(ttft_s=1.0, tpot_s=0.020)
    search = Search(model, wl, slo, replace(cluster, gpus=8), seeds=(0, 1))
    sc = search.screen()
    per_gpu = {}
    for n in (1, 4):
        cand = sc.split_candidate(1, n, 1, n)
        per_gpu[n] = search.finalize(cand).per_gpu
        # and the closed form agrees with the steady-state simulation
        assert per_gpu[n] == pytest.approx(cand.per_gpu, rel=0.12)
    assert per_gpu[4] == pytest.approx(per_gpu[1], rel=0.12)
