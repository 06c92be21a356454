"""Samplers against a fake NVML / fake dcgm-exporter: every field, NotSupported, lost GPUs, UUID matching."""

from __future__ import annotations

import bisect
import dataclasses
import logging
import random

import pytest

from phaselens.agent.samplers.dcgm import DcgmBindingsSampler, DcgmSampler
from phaselens.agent.samplers.gpm import GpmSampler
from phaselens.agent.samplers.nvml import NvmlSampler
from phaselens.agent.samplers.replay import ReplaySampler
from phaselens.agent.samplers.simulated import H100_SIGNATURES, SimulatedGpuModel, SimulatedSampler
from phaselens.agent.timeline import Timeline
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import SampleRecord, StepRecord, Trace
from tests.agent.fake_nvml import FakeGpu, FakeNvml


class Clock_:
    def __init__(self, t: int = 1_000_000_000_000):
        self.t = t

    def __call__(self) -> int:
        return self.t


def updates(recs: list[SampleRecord]) -> list[SampleRecord]:
    return [r for r in recs if any(v is not None for v in r.values.values())]


# ------------------------------------------------------------------ GPM


def test_gpm_reads_every_field_as_ratios_and_marks_polls_without_refresh() -> None:
    nv = FakeNvml([FakeGpu("GPU-a", refresh_polls=3)])
    s = GpmSampler(nvml=nv)
    got = [s.sample() for _ in range(10)]  # the first only primes; refreshes at polls 3, 6, 9
    flat = [r for batch in got for r in batch]
    assert all(r.source == "gpm" and r.gpu_uuid == "GPU-a" for r in flat)
    ups = updates(flat)
    assert len(ups) == 3  # one refresh every 3 polls
    assert ups[0].values == pytest.approx({"sm_active": 0.967, "sm_occupancy": 0.143, "tensor_active": 0.938,
                                           "dram_active": 0.255, "fp16_active": 0.0})
    stale = [r for r in flat if r not in ups]
    assert stale and all(set(r.values) == set(ups[0].values) and all(v is None for v in r.values.values())
                         for r in stale)


def test_gpm_unsupported_metric_logged_once_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    nv = FakeNvml([FakeGpu("GPU-a", refresh_polls=1, unsupported={13})])
    s = GpmSampler(nvml=nv)
    with caplog.at_level(logging.WARNING):
        recs = [r for _ in range(6) for r in s.sample()]
    assert recs and all("fp16_active" not in r.values for r in recs)
    assert all(r.values["sm_active"] == pytest.approx(0.967) for r in recs)
    assert sum("fp16_active" in m for m in caplog.messages) == 1


def test_gpm_gpu_without_support_is_left_out() -> None:
    nv = FakeNvml([FakeGpu("GPU-old", gpm_supported=False), FakeGpu("GPU-new", refresh_polls=1)])
    s = GpmSampler(nvml=nv)
    assert [g.uuid for g in s.gpus] == ["GPU-new"]


def test_gpm_gpu_that_disappears_is_marked_failed_and_the_others_go_on() -> None:
    a, b = FakeGpu("GPU-a", refresh_polls=1), FakeGpu("GPU-b", refresh_polls=1)
    s = GpmSampler(nvml=FakeNvml([a, b]))
    s.sample()
    assert {r.gpu_uuid for r in s.sample()} == {"GPU-a", "GPU-b"}
    a.lost = True
    got = s.sample()
    assert {r.gpu_uuid for r in got} == {"GPU-b"}
    assert [g.uuid for g in s.failed] == ["GPU-a"] and "GPU_IS_LOST" in s.failed[0].last_error
    assert {r.gpu_uuid for r in s.sample()} == {"GPU-b"}


def test_two_gpus_reordered_by_cuda_visible_devices_matched_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine runs with CUDA_VISIBLE_DEVICES=1,0: its cuda:0 is NVML index 1. NVML ignores the variable, so
    # the agent must match by UUID: asking for [B, A] gives B's values under B's UUID.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    a = FakeGpu("GPU-aaaa", refresh_polls=1, gpm={2: 10.0, 3: 1.0, 5: 5.0, 10: 90.0, 13: 0.0})
    b = FakeGpu("GPU-bbbb", refresh_polls=1, gpm={2: 99.0, 3: 20.0, 5: 95.0, 10: 20.0, 13: 0.0})
    s = GpmSampler(nvml=FakeNvml([a, b]), uuids=["GPU-bbbb", "GPU-aaaa"])
    assert [(g.uuid, g.index) for g in s.gpus] == [("GPU-bbbb", 1), ("GPU-aaaa", 0)]
    s.sample()
    by_uuid = {r.gpu_uuid: r.values for r in s.sample()}
    assert by_uuid["GPU-bbbb"]["tensor_active"] == pytest.approx(0.95)
    assert by_uuid["GPU-aaaa"]["tensor_active"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="GPU-cccc"):
        GpmSampler(nvml=FakeNvml([a, b]), uuids=["GPU-cccc"])


# ------------------------------------------------------------------ NVML


def test_nvml_reads_every_field() -> None:
    gpu = FakeGpu("GPU-a", util_samples=[(10, 50), (20, 60)])
    clock = Clock_()
    s = NvmlSampler(nvml=FakeNvml([gpu]), clock=clock, buffer_interval_ns=0)
    first = s.sample()
    assert len(first) == 1  # the first buffer read only sets the mark
    assert first[0].values == pytest.approx({"gpu_util": 0.87, "mem_util": 0.41, "power_w": 612.0,
                                             "sm_clock_hz": 1755e6, "mem_used_bytes": 40 * 1024**3})
    gpu.util_samples.append((30, 70))
    got = s.sample()
    buffered = [r for r in got if r.t_ns == 30_000]
    assert len(got) == 2 and buffered and buffered[0].values == {"gpu_util": 0.7}


def test_nvml_reads_the_timestamped_buffer_every_interval_and_loses_no_sample() -> None:
    gpu = FakeGpu("GPU-a", util_samples=[(10, 50)])
    clock = Clock_()
    s = NvmlSampler(nvml=FakeNvml([gpu]), clock=clock, buffer_interval_ns=5_000_000_000)
    s.sample()  # sets the mark
    seen, counts = [], []
    for k in range(1, 11):  # ten polls a second apart, a new driver sample before each
        gpu.util_samples.append((10 + k * 1_000_000, 50 + k))
        clock.t += 1_000_000_000
        seen += [r for r in s.sample() if "power_w" not in r.values]
        counts.append(len(seen))
    assert counts == [0, 0, 0, 0, 5, 5, 5, 5, 5, 10]  # read at 5 s and 10 s, not every poll
    assert [r.t_ns for r in seen] == [(10 + k * 1_000_000) * 1000 for k in range(1, 11)]  # none lost


def test_nvml_not_supported_field_skipped_and_lost_gpu_marked(caplog: pytest.LogCaptureFixture) -> None:
    a = FakeGpu("GPU-a", unsupported={"power", "samples"})
    b = FakeGpu("GPU-b")
    s = NvmlSampler(nvml=FakeNvml([a, b]))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            recs = {r.gpu_uuid: r.values for r in s.sample() if "gpu_util" in r.values and len(r.values) > 1}
    assert "power_w" not in recs["GPU-a"] and recs["GPU-a"]["sm_clock_hz"] == pytest.approx(1755e6)
    assert "power_w" in recs["GPU-b"]
    assert sum("power_w" in m for m in caplog.messages) == 1
    b.lost = True
    assert {r.gpu_uuid for r in s.sample()} == {"GPU-a"}
    assert [g.uuid for g in s.failed] == ["GPU-b"]


# ------------------------------------------------------------------ DCGM

PAGE = """# HELP DCGM_FI_PROF_SM_ACTIVE Ratio of cycles an SM has at least 1 warp assigned.
# TYPE DCGM_FI_PROF_SM_ACTIVE gauge
DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-a",device="nvidia0",modelName="NVIDIA H100",Hostname="node-a"} 0.91
DCGM_FI_PROF_SM_ACTIVE{gpu="1",UUID="GPU-b",device="nvidia1",modelName="NVIDIA H100",hostname="node-a"} 0.42
DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-x",device="nvidia0",hostname="node-b"} 0.11
# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{gpu="0",UUID="GPU-a",Hostname="node-a"} 0.85
# TYPE DCGM_FI_PROF_DRAM_ACTIVE gauge
DCGM_FI_PROF_DRAM_ACTIVE{gpu="0",UUID="GPU-a",Hostname="node-a"} 0.33
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",Hostname="node-a"} 97
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-a",Hostname="node-a"} 601.5
# TYPE DCGM_FI_PROF_SM_OCCUPANCY gauge
DCGM_FI_PROF_SM_OCCUPANCY{gpu="0",UUID="GPU-a",Hostname="node-a"} 0.14
# TYPE DCGM_FI_PROF_PIPE_FP16_ACTIVE gauge
DCGM_FI_PROF_PIPE_FP16_ACTIVE{gpu="0",UUID="GPU-a",Hostname="node-a"} 0.02
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{gpu="0",UUID="GPU-a",Hostname="node-a"} 41
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-a",Hostname="node-a"} 1755
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",Hostname="node-a"} 40960
# TYPE DCGM_FI_DEV_SOMETHING_NEW gauge
DCGM_FI_DEV_SOMETHING_NEW{gpu="0",UUID="GPU-a",Hostname="node-a"} 5
"""


def test_dcgm_fields_both_hostname_labels_and_uuid_matching() -> None:
    pages = [PAGE]
    s = DcgmSampler(url="http://x:9400/metrics", hostname="node-a", http_get=lambda url, t: pages[0])
    got = {r.gpu_uuid: r for r in s.sample()}
    assert set(got) == {"GPU-a", "GPU-b"}  # node-b's GPU filtered out; both label spellings accepted
    assert got["GPU-a"].source == "dcgm"
    expected = {"sm_active": 0.91, "tensor_active": 0.85, "dram_active": 0.33, "gpu_util": 0.97,
                "power_w": 601.5, "sm_occupancy": 0.14, "fp16_active": 0.02, "mem_util": 0.41,
                "sm_clock_hz": 1755e6, "mem_used_bytes": 40960 * 1024**2}
    assert got["GPU-a"].values == pytest.approx(expected)
    only_b = DcgmSampler(url="http://x/metrics", uuids=["GPU-b"], http_get=lambda url, t: PAGE).sample()
    assert [r.gpu_uuid for r in only_b] == ["GPU-b"]
    # an unchanged profiling value is "not updated"
    again = {r.gpu_uuid: r for r in s.sample()}
    assert again["GPU-a"].values["sm_active"] is None and again["GPU-a"].values["power_w"] == 601.5


def test_dcgm_scrape_failure_is_reported_not_raised() -> None:
    def boom(url: str, timeout: float) -> str:
        raise ConnectionError("connection refused")

    s = DcgmSampler(url="http://x/metrics", http_get=boom)
    assert s.sample() == [] and "connection refused" in s.last_error
    with pytest.raises(ValueError, match="ftp://x"):
        DcgmSampler(url="ftp://x")


def test_dcgm_bindings_seam() -> None:
    class Reader:
        def GetLatestGpuValuesAsFieldIdDict(self):  # noqa: N802 - DCGM's name
            return {0: {1002: 0.5, 1004: 0.25, 1005: 0.75, 203: 88.0, 155: 300.0}}

    recs = DcgmBindingsSampler(reader=Reader(), uuids={0: "GPU-a"}).sample()
    assert recs[0].gpu_uuid == "GPU-a" and recs[0].values == pytest.approx(
        {"sm_active": 0.5, "tensor_active": 0.25, "dram_active": 0.75, "gpu_util": 0.88, "power_w": 300.0})


# ------------------------------------------------------------------ simulated and replay


def _step(uuid: str, phase: Phase, t0: int, t1: int, i: int = 0) -> StepRecord:
    return StepRecord(gpu_uuid=uuid, engine_id="e0", role=Role.COLOCATED, phase=phase, step=i, t0_ns=t0,
                      t1_ns=t1, clock=Clock.HOST, prefill_tokens=0, decode_tokens=0, batch=1,
                      context_tokens=0, flops=0.0, bytes=0.0)


def test_simulated_refreshes_every_100ms_with_the_phase_signature() -> None:
    tl = Timeline(horizon_s=60)
    t0 = 1_000_000_000_000
    tl.add_step(_step("GPU-sim-0", Phase.PREFILL, t0 - 10**9, t0 + 10 * 10**9))
    clock = Clock_(t0)
    model = SimulatedGpuModel(noise=0.0, glitch_rate=0.0)
    s = SimulatedSampler(["GPU-sim-0"], tl, model=model, clock=clock)
    recs = []
    for _ in range(100):  # 1 s of 10 ms polls
        recs.extend(s.sample())
        clock.t += 10_000_000
    assert all(r.source == "simulated" for r in recs)
    ups = updates(recs)
    assert 9 <= len(ups) <= 11
    assert ups[-1].values["tensor_active"] == pytest.approx(H100_SIGNATURES[Phase.PREFILL]["tensor_active"])
    assert model.lag_ms(0) == 50.0 and model.lag_ms(150.0) == pytest.approx(10.0 + (40 + 60) % 100)


def test_replay_keeps_spacing_and_shifts_to_now() -> None:
    base = 5_000_000_000
    recorded = dataclasses.replace(_step("GPU-1", Phase.DECODE, base, base + 10_000_000), flops=1e12,
                                   bytes=2e9)
    trace = Trace(steps=[recorded],
                  samples=[SampleRecord("GPU-1", "gpm", base + i * 100_000_000, {"sm_active": 0.5})
                           for i in range(5)])
    clock = Clock_(10**15)
    r = ReplaySampler(trace, speed=2.0, clock=clock)
    assert len(r.sample()) == 1
    clock.t += 100_000_000  # 0.1 s at 2x = 0.2 s of trace
    got = r.sample()
    assert [g.t_ns - 10**15 for g in got] == [50_000_000, 100_000_000]
    (due,) = r.steps_due()
    assert not r.finished
    # half the duration at 2x, and half the work in it: FLOPs and bytes per second as recorded (MFU, MBU)
    orig = trace.steps[0]
    assert due.t1_ns - due.t0_ns == 5_000_000
    assert due.flops / due.duration_s == pytest.approx(orig.flops / orig.duration_s)
    assert due.bytes / due.duration_s == pytest.approx(orig.bytes / orig.duration_s)
    clock.t += 10**9
    r.sample()
    assert r.finished
    with pytest.raises(ValueError, match="-1"):
        ReplaySampler(trace, speed=-1)


def test_gpm_polls_lock_onto_the_refresh_cadence() -> None:
    # refreshes every 10 polls of 10 ms = 100 ms; once the cadence is known, polls land just before the
    # expected refresh and retry every 4 ms when early: about one poll per refresh (a fixed 10 ms grid takes
    # ten), every refresh seen within one retry
    clock = Clock_(10**15)
    gpu = FakeGpu("GPU-a", refresh_polls=1)
    s = GpmSampler(nvml=FakeNvml([gpu]), clock=clock)
    refresh_ns = 100_000_000
    polls, seen, steady_polls = 0, [], 0
    end = clock.t + 10 * 10**9
    next_due = clock.t
    while clock.t < end:
        clock.t = next_due
        gpu.polls = (clock.t // refresh_ns) * gpu.refresh_polls  # the fake's generation follows the clock
        recs = s.sample()
        polls += 1
        steady_polls += len(seen) >= 20
        seen += [r.t_ns for r in updates(recs)]
        next_due = s.next_due_ns(clock.t, 10_000_000)
    assert len(seen) >= 98  # every refresh of the 10 s, less the first ones that only prime
    # once locked: one poll per refresh, and a retry now and then (a 10 ms grid takes ten per refresh)
    assert steady_polls <= 1.2 * (len(seen) - 20), (steady_polls, len(seen))
    lags = [(t % refresh_ns) / 1e6 for t in seen[10:]]
    assert max(lags) <= 4.0  # each refresh seen within one retry


def test_gpm_polls_stay_locked_under_refresh_jitter() -> None:
    # the H100's refreshes come every ~100 ms +-1 ms: planned from the refresh grid (not from when each
    # refresh was seen), about one poll per refresh, each seen a few ms after it, with no drift
    rng = random.Random(7)
    clock = Clock_(10**15)
    gpu = FakeGpu("GPU-a", refresh_polls=1)
    s = GpmSampler(nvml=FakeNvml([gpu]), clock=clock)
    refresh_ns = 100_000_000
    start = clock.t - clock.t % refresh_ns
    refreshes = [start + k * refresh_ns + rng.randint(-1_000_000, 1_000_000) for k in range(200)]
    seen, steady_polls = [], 0
    next_due = clock.t
    while clock.t < start + 15 * 10**9:
        clock.t = next_due
        gpu.polls = bisect.bisect_right(refreshes, clock.t)
        recs = s.sample()
        steady_polls += len(seen) >= 20
        seen += [(r.t_ns, refreshes[gpu.polls - 1]) for r in updates(recs)]
        next_due = s.next_due_ns(clock.t, 10_000_000)
    assert len(seen) >= 140
    steady = len(seen) - 20
    assert steady_polls <= 1.2 * steady, (steady_polls, steady)
    lags = [(t - r) / 1e6 for t, r in seen[10:]]
    assert max(lags) <= 7.0 and sum(lags) / len(lags) <= 3.0, lags


def test_gpm_polls_each_gpu_on_its_own_refresh_phase() -> None:
    # two GPUs refreshing every 100 ms, 37 ms apart: once locked, each GPU is polled around its own refreshes
    # only (polling both whenever either is due would double every GPU's polls), each refresh seen in time
    clock = Clock_(10**15)
    gpus = [FakeGpu("GPU-a", refresh_polls=1), FakeGpu("GPU-b", refresh_polls=1)]
    phase_ns = {"GPU-a": 0, "GPU-b": 37_000_000}
    nv = FakeNvml(gpus)
    polls: dict[str, int] = {"GPU-a": 0, "GPU-b": 0}
    get = nv.nvmlGpmSampleGet

    def counted(gpu: FakeGpu, sample: object) -> None:
        polls[gpu.uuid] += 1
        get(gpu, sample)

    nv.nvmlGpmSampleGet = counted  # type: ignore[method-assign]
    s = GpmSampler(nvml=nv, clock=clock)
    refresh_ns = 100_000_000
    seen: dict[str, list[int]] = {"GPU-a": [], "GPU-b": []}
    steady = {"GPU-a": 0, "GPU-b": 0}
    end = clock.t + 10 * 10**9
    next_due = clock.t
    while clock.t < end:
        clock.t = next_due
        for gpu in gpus:  # each fake's generation follows the clock, on its own phase
            gpu.polls = (clock.t - phase_ns[gpu.uuid]) // refresh_ns
        before = dict(polls)
        for r in updates(s.sample()):
            seen[r.gpu_uuid].append(r.t_ns)
        for uuid in polls:
            steady[uuid] += (polls[uuid] - before[uuid]) * (len(seen[uuid]) >= 20)
        next_due = s.next_due_ns(clock.t, 10_000_000)
    for uuid in polls:
        assert len(seen[uuid]) >= 98, uuid  # every refresh of the 10 s, less the first ones that only prime
        assert steady[uuid] <= 1.2 * (len(seen[uuid]) - 20), (uuid, steady[uuid], len(seen[uuid]))
        lags = [((t - phase_ns[uuid]) % refresh_ns) / 1e6 for t in seen[uuid][10:]]
        assert max(lags) <= 4.0, uuid


def test_dcgm_failures_are_logged_once_not_per_poll(caplog: pytest.LogCaptureFixture) -> None:
    def boom(url: str, timeout: float) -> str:
        raise ConnectionError("connection refused")

    s = DcgmSampler(url="http://x/metrics", http_get=boom)
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            s.sample()
    assert sum("connection refused" in m for m in caplog.messages) == 1
