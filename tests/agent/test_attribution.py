"""The attribution method: unmix recovers per-phase values through a drifting, wrapping lag and glitches;
naive does not; not enough data is said; MFU/MBU are exact; unknown GPUs say so."""

from __future__ import annotations

import pytest

from phaselens.agent.attribution import AttributionConfig, Attributor, attribution_to_dict
from phaselens.agent.samplers.simulated import H100_SIGNATURES, SimulatedGpuModel
from phaselens.agent.state import GpuIdentity
from phaselens.gpus import gpu_spec
from phaselens.phase import Phase
from phaselens.trace import SampleRecord
from tests.agent.sim_helpers import T0, engine_like_steps, simulate, step

UUID = "GPU-sim-0"
KEYS = ("sm_active", "tensor_active", "dram_active")


def max_error(result, truth=H100_SIGNATURES) -> float:
    return max(abs(result.phases[p].values[k] - truth[p][k]) for p in Phase.busy() for k in KEYS)


@pytest.fixture(scope="module")
def engine_run():
    steps = engine_like_steps(UUID, 60.0, seed=1)
    # lag starts near the top of its range and drifts 1 ms/s: it wraps (110 -> 10 ms) within the run
    model = SimulatedGpuModel(lag_start_ms=85.0, lag_drift_ms_per_s=1.0, noise=0.01, glitch_rate=0.02)
    return steps, simulate(steps, UUID, 60.0, model, seed=2)


def test_unmix_recovers_phases_through_wrapping_lag_and_glitches(engine_run) -> None:
    steps, samples = engine_run
    ident = GpuIdentity(uuid=UUID, index=0, name="simulated")
    unmix = Attributor(AttributionConfig(horizon_s=120)).attribute(ident, steps, samples)
    naive = Attributor(AttributionConfig(method="naive", horizon_s=120)).attribute(ident, steps, samples)
    assert set(unmix.phases) == set(Phase.busy())
    assert max_error(unmix) < 0.02
    assert max_error(naive) > 0.1  # the baseline this method exists to beat
    assert unmix.alignment_offset_s is not None and -0.111 <= unmix.alignment_offset_s <= -0.009
    for p in Phase.busy():
        assert 0 < unmix.phases[p].uncertainty["tensor_active"] < 0.02
    assert unmix.windows > 500


def test_offset_is_tracked_not_fitted_once(engine_run) -> None:
    steps, samples = engine_run
    att = Attributor(AttributionConfig(horizon_s=120))
    att.attribute(GpuIdentity(uuid=UUID, index=0, name=""), steps, samples)
    offsets_ms = [o * 1e3 for _, o in att.last_offsets]
    model = SimulatedGpuModel(lag_start_ms=85.0, lag_drift_ms_per_s=1.0)
    # each chunk's offset is within a few ms of the simulated lag at that time (including after the wrap)
    for (start_s, off_s) in att.last_offsets[1:-1]:
        true_ms = model.lag_ms(start_s + 1.5)
        assert abs(off_s * 1e3 - true_ms) < 6.0, (start_s, off_s * 1e3, true_ms)
    assert max(offsets_ms) > 95 and min(offsets_ms) < 30  # it followed the wrap


def test_not_enough_data_below_minimum() -> None:
    steps = [step(UUID, Phase.PREFILL, T0, T0 + 2 * 10**9)]
    values = {"sm_active": 0.9, "tensor_active": 0.9, "dram_active": 0.2}
    samples = [SampleRecord(UUID, "gpm", T0 + i * 100_000_000, values) for i in range(5)]
    res = Attributor().attribute(GpuIdentity(uuid=UUID, index=0, name=""), steps, samples)
    assert res.phases == {} and res.windows == 5
    doc = attribution_to_dict(res)
    assert doc["phases"]["prefill"]["status"] == "not enough data"


def test_phase_with_too_little_time_is_not_enough_data() -> None:
    steps = engine_like_steps(UUID, 20.0, seed=3)
    steps = [s for s in steps if s.phase != Phase.MIXED]
    steps.append(step(UUID, Phase.MIXED, T0 + 10**9, T0 + 10**9 + 10**7))
    samples = simulate(steps, UUID, 20.0, SimulatedGpuModel(glitch_rate=0.0))
    res = Attributor().attribute(GpuIdentity(uuid=UUID, index=0, name=""), steps, samples)
    assert Phase.MIXED not in res.phases and {Phase.PREFILL, Phase.DECODE} <= set(res.phases)


def test_exact_mfu_mbu_from_steps_and_unknown_gpu() -> None:
    spec = gpu_spec("NVIDIA H100 80GB HBM3")
    steps = engine_like_steps(UUID, 20.0, seed=4)
    samples = simulate(steps, UUID, 20.0, SimulatedGpuModel(glitch_rate=0.0))
    res = Attributor().attribute(GpuIdentity(uuid=UUID, index=0, name=spec.name), steps, samples, spec=spec)
    # the helper gives every step 5e14 FLOP/s and 1e12 B/s while it runs
    for p in Phase.busy():
        assert res.phases[p].mfu == pytest.approx(5e14 / spec.peak_bf16_flops, rel=1e-6)
        assert res.phases[p].mbu == pytest.approx(1e12 / spec.peak_dram_bytes_per_s, rel=1e-6)
    mystery = GpuIdentity(uuid=UUID, index=0, name="Mystery GPU")
    res2 = Attributor().attribute(mystery, steps, samples, spec=None)
    assert all(pv.mfu is None for pv in res2.phases.values())


def test_time_shares_and_json_shape(engine_run) -> None:
    steps, samples = engine_run
    ident = GpuIdentity(uuid=UUID, index=0, name="")
    res = Attributor(AttributionConfig(horizon_s=120)).attribute(ident, steps, samples)
    assert sum(res.time_share.values()) == pytest.approx(1.0, abs=0.02)
    doc = attribution_to_dict(res)
    assert set(doc) == {"phases", "blended", "alignment_offset_ms", "windows", "method"}
    assert {"prefill", "decode", "mixed", "idle"} == set(doc["phases"])
    assert "uncertainty" in doc["phases"]["prefill"] and doc["method"] == "unmix"


def test_bad_config_names_the_value() -> None:
    with pytest.raises(ValueError, match="'magic'"):
        AttributionConfig(method="magic")
    with pytest.raises(ValueError, match="-5"):
        AttributionConfig(horizon_s=-5)


def test_not_enough_counter_data_still_reports_exact_mfu() -> None:
    spec = gpu_spec("NVIDIA H100 80GB HBM3")
    steps = [step(UUID, Phase.PREFILL, T0, T0 + 10**9, flops=5e14, nbytes=1e12)]
    res = Attributor().attribute(GpuIdentity(uuid=UUID, index=0, name=spec.name), steps, [], spec=spec)
    assert res.phases[Phase.PREFILL].values == {}
    assert res.phases[Phase.PREFILL].mfu == pytest.approx(5e14 / spec.peak_bf16_flops)
    doc = attribution_to_dict(res)["phases"]["prefill"]
    assert doc["status"] == "not enough data" and doc["mfu"] == pytest.approx(0.5056, abs=1e-4)
