"""Host time between steps: the fit recovers a known gap line, the cadence adds it, and the serving overhead
is recovered from a request log whose TPOTs carry a known extra per step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from phaselens.advisor.host_gap import GAP_MAX_S, SERVING_PER_SEQ_REPEATS, HostGap, estimate_serving_overhead
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import LoggedTimes, Workload
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import StepRecord

DECODE_GAP = (3.0e-4, 2.0e-5)  # s, s per sequence
MIXED_GAP = (1.0e-3, 3.0e-5)
TABLE = {1: {"prefill": [0.010, 4.0e-5, 0.0], "decode": [0.006, 1.0e-8, 1.0e-5]}}


def engine_steps(n: int = 400, seed: int = 0) -> list[StepRecord]:
    """One engine stepping: runs of decode steps (a mixed step now and then), each run after an idle
    pause and a prefill-only step, the gaps before decode and mixed steps on the known lines."""
    rng = np.random.default_rng(seed)
    steps: list[StepRecord] = []
    t = 1_000_000_000

    def add(phase: Phase, batch: int, gap_s: float, prefill: int = 0) -> None:
        nonlocal t
        t += int(gap_s * 1e9)
        dur = int(0.006e9)
        decodes = 0 if phase is Phase.PREFILL else batch - (1 if phase is Phase.MIXED else 0)
        steps.append(StepRecord("GPU-0", "e0", Role.COLOCATED, phase, len(steps), t, t + dur, Clock.GPU,
                                prefill, decodes, batch, 100 * batch + prefill, 0.0, 0.0))
        t += dur

    while len(steps) < n:
        add(Phase.PREFILL, 1, 0.5, prefill=256)  # after idle time: not back-to-back, left out
        for _ in range(20):
            b = int(rng.integers(1, 65))
            if rng.random() < 0.2:
                h0, h1 = MIXED_GAP
                add(Phase.MIXED, b + 1, (h0 + h1 * (b + 1)) * (1 + 0.02 * rng.standard_normal()), prefill=200)
            else:
                h0, h1 = DECODE_GAP
                gap = (h0 + h1 * b) * (1 + 0.02 * rng.standard_normal())
                if rng.random() < 0.05:
                    gap += 0.004  # a stall (GC, a slow launch): the median line ignores it
                add(Phase.DECODE, b, gap)
    return steps


def test_fit_recovers_the_gap_lines_from_back_to_back_pairs():
    gap = HostGap.fit(engine_steps())
    assert gap.fitted and gap.pairs["decode"] > 200 and gap.pairs["mixed"] > 40
    assert gap.decode[0] == pytest.approx(DECODE_GAP[0], rel=0.1)
    assert gap.decode[1] == pytest.approx(DECODE_GAP[1], rel=0.05)
    assert gap.mixed[0] == pytest.approx(MIXED_GAP[0], rel=0.1)
    assert gap.mixed[1] == pytest.approx(MIXED_GAP[1], rel=0.1)
    assert gap.prefill == gap.mixed  # prefill-only steps follow idle time: they take the mixed line
    assert gap.to_dict()["gap_max_s"] == GAP_MAX_S


def test_no_pairs_no_gap():
    # every step after a long pause: nothing is back-to-back
    steps = [s for s in engine_steps() if s.phase is Phase.PREFILL]
    assert not HostGap.fit(steps).fitted
    assert HostGap.fit(steps).before(Phase.DECODE, 32) == 0.0


def test_cadence_is_gap_plus_gpu_time_and_serving_adds_per_step_and_per_sequence():
    model = StepModel.from_table(TABLE)
    co = replace(model.coefficients(1), host=HostGap(decode=DECODE_GAP, mixed=MIXED_GAP, prefill=MIXED_GAP))
    assert co.decode_step(32, 3200) == pytest.approx(co.decode_time(32, 3200) + 3.0e-4 + 32 * 2.0e-5)
    assert co.mixed_step(200, 200 ** 2, 32, 3200) == pytest.approx(
        co.mixed_time(200, 200 ** 2, 32, 3200) + 1.0e-3 + 33 * 3.0e-5)
    assert co.prefill_step(512, 512 ** 2) == pytest.approx(co.prefill_time(512, 512 ** 2) + 1.0e-3 + 3.0e-5)
    served = replace(co, host=co.host.with_serving(5.0e-4, "test"))
    extra = 5.0e-4 + SERVING_PER_SEQ_REPEATS * DECODE_GAP[1] * 32
    assert served.decode_step(32, 3200) == pytest.approx(co.decode_step(32, 3200) + extra)
    assert served.host.engine_only() == co.host


def test_serving_overhead_recovered_from_the_logged_tpots():
    """Requests one after another on one worker: each decode interval is its steps at the model's cadence
    plus a known serving overhead per step; the estimate finds that overhead."""
    model = StepModel.from_table(TABLE)
    co = replace(model.coefficients(1), host=HostGap(decode=DECODE_GAP, mixed=MIXED_GAP, prefill=MIXED_GAP,
                                                     pairs={"decode": 100}))
    overhead = 4.0e-4
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 400, 30)
    output = rng.integers(50, 300, 30)
    arrival, first, finish = [], [], []
    t = 0.0
    for p, o in zip(prompt, output):
        cadence = co.decode_step(1, p + o / 2) + overhead + SERVING_PER_SEQ_REPEATS * DECODE_GAP[1]
        arrival.append(t)
        first.append(t + 0.02)
        finish.append(t + 0.02 + (o - 1) * cadence)
        t = finish[-1] + 0.5
    wl = Workload.from_arrays(1.0, prompt, output)
    times = LoggedTimes(np.array(arrival), np.array(first), np.array(finish), np.array(["w0"] * 30),
                        np.ones(30, bool))
    est = estimate_serving_overhead(co, replace(wl, logged_times=times), chunk_budget=2048)
    assert est is not None and est.requests == 30 and est.batch == pytest.approx(1.0)
    assert est.per_step_s == pytest.approx(overhead, rel=1e-6)
    assert "serving overhead per step estimated at 0.40 ms" in est.note()
    # without a log there is nothing to estimate from
    assert estimate_serving_overhead(co, wl) is None
