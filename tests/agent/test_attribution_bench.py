"""The ground-truth bench's plan and evaluation on CPU (bench/attribution_accuracy.py, issue 12).

The 8B regime's in-context truth: windows that lie inside a one-phase run of the regime itself for every
window delay 0-110 ms, averaged per phase and held out of the trace the estimate is graded on. Checked on a
synthetic recording in the recorder's raw format (meta.json, steps.jsonl, raw_poll.jsonl), whose GPM windows
come from a known per-phase signature through a drifting, wrapping lag; the signature inside the 8B regime
differs from the pure runs' (as the H100's did), so the in-context truth has something to recover.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phaselens.trace import read_trace

from tests.bench_module import load_bench

T0 = 1_800_000_000_000_000_000
MS = 1_000_000
PERIOD_MS = 100.0

aa = load_bench("attribution_accuracy")

#: per context and phase: sm_active, sm_occupancy, tensor_active, dram_active, fp16_active (ratios); the
#: pure runs' are the H100's pure-run truth, the 8B regime's its duty-0.5 truth (bench/RESULTS.md)
SIGNATURES = {
    "pure": {"prefill": (0.966, 0.143, 0.938, 0.259, 0.0), "decode": (0.834, 0.120, 0.045, 0.855, 0.0),
             "mixed": (0.912, 0.134, 0.577, 0.512, 0.0)},
    "8b": {"prefill": (0.922, 0.140, 0.895, 0.287, 0.0), "decode": (0.800, 0.118, 0.041, 0.845, 0.0),
           "mixed": (0.860, 0.130, 0.520, 0.527, 0.0)},
}
IDLE = (0.0, 0.0, 0.0, 1e-5, 0.0)
CLOCK_MHZ = {"pure": 1400.0, "8b": 1800.0}


def lag_ms(t_ns: int) -> float:
    """Window end to refresh: a sawtooth 10-100 ms drifting 1 ms/s, wrapping 25 s in (the poll adds < 10 ms,
    so the window ends 10-110 ms before the poll that sees it, the range the bench assumes)."""
    return 10.0 + (65.0 + (t_ns - T0) / 1e9) % 90.0


def synthesize(raw: Path, regimes: dict[str, float], *, seed: int = 0, noise: float = 0.003,
               uuid: str = "GPU-synth") -> None:
    """A recording in ``record``'s raw format: pure runs of each phase (3 s of 100 ms steps), idle, then each
    regime of ``regimes`` (name -> seconds, planned by ``make_plan``), GPM polled every 10 ms."""
    rng = np.random.default_rng(seed)
    plan_rng = random.Random(seed)
    steps: list[dict] = []
    spans: list[dict] = []
    context: list[str] = []  # per step: whose signature it runs with
    t = T0 + 1000 * MS

    def run(plan: list[tuple[str, float, float]], label: str, ctx: str) -> None:
        nonlocal t
        for phase, ms, gap in plan:
            t += int(gap * MS)
            t1 = t + int(ms * MS)
            steps.append({"regime": label, "phase": phase, "t0_ns": t, "t1_ns": t1, "target_ms": ms,
                          "big": int(phase != "decode"), "skinny": int(phase != "prefill")})
            context.append(ctx)
            t = t1

    for phase in aa.PHASES:
        start = t
        run([(phase, 100.0, 0.0)] * 30, "pure_a", "pure")
        spans.append({"kind": "pure", "phase": phase, "duty": 1.0, "start_ns": start, "end_ns": t})
        # and a duty-cycled run of the 8B step length, idle between (as ``record``'s truth runs)
        start = t
        length = aa.STEP_8B_MS[phase]
        run([(phase, length, plan_rng.expovariate(1.0 / length)) for _ in range(int(3000 / length / 2))],
            "duty_a", "pure")
        spans.append({"kind": "duty", "phase": phase, "duty": 0.5, "start_ns": start, "end_ns": t})
    start = t
    t += 1000 * MS
    spans.append({"kind": "pure", "phase": "idle", "duty": 0.0, "start_ns": start, "end_ns": t})
    for regime, seconds in regimes.items():
        t += 500 * MS
        start = t
        run(aa.make_plan(regime, seconds, plan_rng), regime, "8b" if regime == "8b" else "pure")
        spans.append({"kind": "regime", "regime": regime, "start_ns": start, "end_ns": t})
    end = t + 1000 * MS

    # hardware windows: every 100 ms, each the time-weighted signature of what ran in it
    t0s = np.array([s["t0_ns"] for s in steps])
    polls: dict[int, list[float]] = {}
    w_end = T0 + 1000 * MS
    while w_end < end:
        w_start = w_end - int(PERIOD_MS * MS)
        vals = np.zeros(5)
        busy = 0.0
        for i in range(max(0, int(np.searchsorted(t0s, w_start)) - 1), int(np.searchsorted(t0s, w_end))):
            st = steps[i]
            overlap = max(0, min(st["t1_ns"], w_end) - max(st["t0_ns"], w_start)) / (PERIOD_MS * MS)
            vals += overlap * np.array(SIGNATURES[context[i]][st["phase"]])
            busy += overlap
        vals += (1.0 - busy) * np.array(IDLE) + rng.normal(0.0, noise, 5) * (busy > 0)
        seen = w_end + int(lag_ms(w_end) * MS)
        poll = T0 + math.ceil((seen - T0) / (10 * MS)) * 10 * MS  # the first 10-ms poll after the refresh
        polls[poll] = [100.0 * max(0.0, v) for v in vals]
        w_end += int(PERIOD_MS * MS)

    with open(raw / "raw_poll.jsonl", "w") as fh:
        fh.write(json.dumps({"k": "info", "gpm_supported": 1, "uuid": uuid, "name": "NVIDIA H100 80GB HBM3",
                             "poll_ms": 10.0}) + "\n")
        for poll in range(T0, end, 10 * MS):
            # no refresh since the last poll: DRAM reads 0/0 (NaN), as on the H100
            v = polls.get(poll, [0.0, 0.0, 0.0, float("nan"), 0.0])
            fh.write(json.dumps({"k": "gpm", "t0": poll, "t1": poll + 100_000, "v": v, "r": [0] * 5, "e": ""})
                     + "\n")
            if (poll - T0) % (100 * MS) == 0:
                ctx = "8b" if any(s["kind"] == "regime" and s["regime"] == "8b"
                                  and s["start_ns"] <= poll < s["end_ns"] for s in spans) else "pure"
                fh.write(json.dumps({"k": "nvml", "t": poll, "gpu_util": 1.0, "mem_util": 0.5,
                                     "power_w": 500.0, "sm_clock_hz": CLOCK_MHZ[ctx] * 1e6,
                                     "mem_used_bytes": 1e9}) + "\n")
    with open(raw / "steps.jsonl", "w") as fh:
        for st in steps:
            fh.write(json.dumps(st) + "\n")
    (raw / "meta.json").write_text(json.dumps({
        "host": "synth", "gpu": "NVIDIA H100 80GB HBM3", "calibration_ms": {"big": 1.4, "skinny": 0.33},
        "clock_drift_ns": 0, "ref1_ns": T0, "ref2_ns": end, "poll_ms": 10.0, "regime_s": 0.0, "pure_s": 3.0,
        "spans": spans, "prefill_kernel": "mm8192", "big_flops": aa.BIG_FLOPS, "big_bytes": aa.BIG_BYTES,
        "regimes": list(regimes)}))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw folder, trace folder written from it) of a synthetic 30-s 8B regime."""
    raw = tmp_path_factory.mktemp("raw")
    synthesize(raw, {"8b": 30.0})
    dest = tmp_path_factory.mktemp("traces")
    aa.write_traces(raw, dest)
    return raw, dest


def runs(plan: list[tuple[str, float, float]]) -> list[tuple[str, float]]:
    """(phase, ms) of each run of one phase's steps with no idle gap between them."""
    out: list[tuple[str, float]] = []
    for phase, ms, gap in plan:
        if out and out[-1][0] == phase and gap == 0.0:
            out[-1] = (phase, out[-1][1] + ms)
        else:
            out.append((phase, ms))
    return out


def test_8b_plan_is_seeded_8b_shaped_with_long_runs_of_every_phase() -> None:
    plan = aa.make_plan("8b", 45.0, random.Random(0))
    assert plan == aa.make_plan("8b", 45.0, random.Random(0))
    assert plan != aa.make_plan("8b", 45.0, random.Random(1))
    total = sum(ms + gap for _, ms, gap in plan)
    assert 45_000 <= total < 46_000
    # the step lengths stay 8B-shaped, idle gaps stay in
    bounds = {"prefill": (40.0, 50.0), "decode": (8.0, 12.0), "mixed": (17.0, 23.0)}
    assert all(bounds[ph][0] <= ms <= bounds[ph][1] for ph, ms, _ in plan)
    assert sum(gap > 0 for _, _, gap in plan) > 50
    long = [(ph, ms) for ph, ms in runs(plan) if ms >= aa.CONTEXT_RUN_MS[0]]
    assert {ph for ph, _ in long} == set(aa.PHASES)
    assert all(sum(ph == p for ph, _ in long) >= 3 for p in aa.PHASES)
    assert 0.08 <= sum(ms for _, ms in long) / total <= 0.2
    # most of the regime is still the engine-like mix of short runs
    assert sum(ms for _, ms in runs(plan) if ms < 300) / total > 0.6


def test_other_regimes_draw_as_before() -> None:
    """long/medium/short keep their plan for a seed (the figures of record stay comparable)."""
    rng = random.Random(0)
    plan = aa.make_plan("medium", 5.0, rng)
    ref = random.Random(0)
    expect, total = [], 0.0
    while total < 5000:
        ms = ref.uniform(40.0, 150.0)
        gap = ref.uniform(20.0, 150.0) if ref.random() < 0.12 else 0.0
        expect.append((ref.choice(aa.PHASES), ms, gap))
        total += ms + gap
    assert plan == expect


def test_context_windows_need_the_run_to_cover_every_delay() -> None:
    """A window counts only when [poll - period - 110 ms, poll] is one phase's run: a 310-ms prefill run
    between decode runs yields the one poll 215 ms into it, and a 10-ms idle gap splits a decode run."""
    steps = [{"phase": "decode", "t0_ns": T0, "t1_ns": T0 + 490 * MS},
             {"phase": "prefill", "t0_ns": T0 + 490 * MS, "t1_ns": T0 + 640 * MS},
             {"phase": "prefill", "t0_ns": T0 + 640 * MS, "t1_ns": T0 + 800 * MS},
             {"phase": "decode", "t0_ns": T0 + 800 * MS, "t1_ns": T0 + 1300 * MS},
             {"phase": "decode", "t0_ns": T0 + 1310 * MS, "t1_ns": T0 + 1800 * MS}]
    polls = [T0 + ms * MS for ms in range(5, 2000, 100)]  # refreshes seen every 100 ms
    gpm: list[dict] = [{"t0": t, "t1": t, "v": [90.0, 10.0, 50.0, 40.0, 0.0], "r": [0] * 5, "e": ""}
                       for t in polls]

    def found(recs: list[dict]) -> dict[str, list[int]]:
        return {ph: [(t - T0) // MS for t, _ in rows]
                for ph, rows in aa.context_windows(steps, recs, T0, T0 + 2000 * MS).items()}

    # decode 0-490 covers the polls 305, 405; 800-1300: 1105, 1205; 1310-1800 (after the gap): 1605, 1705
    assert found(gpm) == {"prefill": [705], "decode": [305, 405, 1105, 1205, 1605, 1705], "mixed": []}
    # a late refresh (200 ms after the one before) covers a longer window: that poll no longer qualifies
    late = [g for g in gpm if (g["t0"] - T0) // MS != 605]
    assert found(late)["prefill"] == []


def test_in_context_truth_recovers_the_regime_signature(recording: tuple[Path, Path]) -> None:
    _, dest = recording
    doc = json.loads((dest / "truth.json").read_text())
    context = doc["context_truth"]
    for phase in aa.PHASES:
        assert context["windows"][phase] >= 5, context["windows"]
        for j, key in enumerate(aa.GPM_METRICS):
            want = SIGNATURES["8b"][phase][j]
            assert context["8b"][phase][key] == pytest.approx(want, abs=0.005), (phase, key)
            # the pure runs give the other signature: the two truths differ where the signatures do
            assert doc["truth"][phase][key] == pytest.approx(SIGNATURES["pure"][phase][j], abs=0.005)
        assert context["clock_mhz"][phase] == pytest.approx(CLOCK_MHZ["8b"])
        # the duty-cycled truth runs (idle between steps) fit their own window offset
        for key in aa.TRUTH_KEYS:
            want = SIGNATURES["pure"][phase][aa.GPM_METRICS.index(key)]
            assert doc["duty_truth"][phase][key] == pytest.approx(want, abs=0.01), (phase, key)
    held = context["held_out_t_ns"]
    assert len(held) == sum(context["windows"].values()) == len(set(held))


def test_held_out_windows_never_reach_the_estimate(recording: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    raw, dest = recording
    doc = json.loads((dest / "truth.json").read_text())
    held = set(doc["context_truth"]["held_out_t_ns"])
    meta, _, gpm, _ = aa.load_raw(raw)
    span = next(s for s in meta["spans"] if s["kind"] == "regime")
    updates = {(r["t0"] + r["t1"]) // 2 for r in gpm
               if aa.gpm_values(r)["sm_active"] is not None and span["start_ns"] <= (r["t0"] + r["t1"]) // 2
               < span["end_ns"]}
    assert held < updates
    trace = read_trace(dest / "regime_8b.jsonl")
    in_trace = {s.t_ns for s in trace.samples if s.source == "gpm" and s.values["sm_active"] is not None}
    assert in_trace == updates - held  # every other refresh is there

    # and what the attributor is handed, in evaluate, has none of them
    from phaselens.agent.attribution import Attributor

    seen: list[int] = []
    attribute = Attributor.attribute

    def spy(self: Attributor, gpu: Any, steps: Any, samples: Any, **kw: Any) -> Any:
        seen.extend(s.t_ns for s in samples)
        return attribute(self, gpu, steps, samples, **kw)

    monkeypatch.setattr(Attributor, "attribute", spy)
    results = aa.evaluate({"8b": dest / "regime_8b.jsonl"}, doc)
    assert seen and not held & set(seen)
    r = results["8b"]
    assert r["context_windows"] == doc["context_truth"]["windows"]
    # unmix finds the regime's own signature through the lag: near the in-context truth, not the pure runs'
    assert r["unmix_context"]["max_abs_error"] <= 0.03, r["unmix_context"]
    assert r["unmix_pure"]["max_abs_error"] > r["unmix_context"]["max_abs_error"]
    assert r["naive_context"]["max_abs_error"] > 2 * r["unmix_context"]["max_abs_error"]
    text = aa.print_table(results, doc)
    assert "in-context truth, 8b" in text


def test_a_recording_of_some_regimes_replaces_only_their_fixtures(tmp_path: Path) -> None:
    """``record --regimes 8b`` then ``evaluate --fixtures``: the other regimes' fixtures keep their truth."""
    first, second, dest = tmp_path / "a", tmp_path / "b", tmp_path / "fixtures"
    first.mkdir()
    second.mkdir()
    synthesize(first, {"long": 6.0, "8b": 8.0}, seed=1, uuid="GPU-first")
    synthesize(second, {"8b": 8.0}, seed=2, noise=0.01, uuid="GPU-second")
    aa.write_traces(first, dest, seconds=5.0, updates_only=True, with_nvml=False)
    before = json.loads((dest / "truth.json").read_text())
    long_trace = (dest / "regime_long.jsonl").read_bytes()
    paths = aa.write_traces(second, dest, seconds=5.0, updates_only=True, with_nvml=False)
    after = json.loads((dest / "truth.json").read_text())
    assert set(paths) == {"8b"}
    assert (dest / "regime_long.jsonl").read_bytes() == long_trace
    assert after["regime_truth"]["long"] == before["truth"]
    assert after["regime_clock_mhz"]["long"] == before["regime_clock_mhz"]["long"]
    assert after["regime_truth"]["8b"] == after["truth"] != before["truth"]
    assert after["context_truth"]["held_out_t_ns"] != before["context_truth"]["held_out_t_ns"]
    assert read_trace(dest / "regime_8b.jsonl").gpu_uuids() == ["GPU-second"]
