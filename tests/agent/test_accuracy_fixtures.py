"""Accuracy on the H100 ground-truth fixtures (tests/fixtures/attribution, made by
bench/attribution_accuracy.py on an NVIDIA H100 80GB HBM3: 30 s of each regime, GPM refreshes and CUDA-event
step intervals). Truth: the means of long pure runs of each phase (truth.json; ``regime_truth`` names the one
of the recording behind each fixture, where a later recording replaced some fixtures only).

Figures of record (whole regimes) are in bench/RESULTS.md. On these fixtures unmix is within 0.03 of the
pure-run truth in the long, medium and short regimes. The 8B-shaped regime (re-recorded with long one-phase
runs, bench/attribution_accuracy.py ``make_plan``) is graded against its in-context truth: the GPM windows
wholly inside one-phase runs *of that regime*, held out of the fixture the methods read (truth.json,
``context_truth``). Unmix is within 0.03 of that truth on the 60-s fixture (0.026). Against the separate
pure-run truth it is within 0.04 (0.036, mixed tensor). A phase reads differently in the 8B mix (the first
prefill chunk or mixed step after a decode run reads lower tensor activity than the next ones), so the
pure-run assertion there is the looser one: decode within 0.03, the rest within 0.06, and naive far worse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phaselens.agent.attribution import AttributionConfig, Attributor
from phaselens.agent.state import GpuIdentity
from phaselens.phase import Phase
from phaselens.trace import read_trace

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "attribution"
KEYS = ("sm_active", "tensor_active", "dram_active")
TRUTH = json.loads((FIXTURES / "truth.json").read_text())
#: fewer in-context windows than this for a phase is no truth to grade 0.03 against
MIN_CONTEXT_WINDOWS = 3


def pure_truth(regime: str) -> dict:
    """The pure-run truth of the recording that made ``regime``'s fixture."""
    return TRUTH.get("regime_truth", {}).get(regime, TRUTH["truth"])


def errors(regime: str, method: str, truth: dict | None = None) -> dict[tuple[Phase, str], float]:
    """|estimate - truth| per (phase, key) over the phases ``truth`` has (default: the pure-run truth)."""
    truth = pure_truth(regime) if truth is None else truth
    trace = read_trace(FIXTURES / f"regime_{regime}.jsonl")
    assert trace.malformed == 0 and trace.meta is not None
    gpu = trace.meta.gpus[0]
    res = Attributor(AttributionConfig(method=method, horizon_s=60)).attribute(
        GpuIdentity(uuid=gpu.uuid, index=gpu.index, name=gpu.name), trace.steps, trace.samples)
    out = {}
    for phase in Phase.busy():
        if phase.value not in truth:
            continue
        for key in KEYS:
            out[(phase, key)] = abs(res.phases[phase].values[key] - truth[phase.value][key]) \
                if phase in res.phases else 1.0
    return out


@pytest.mark.parametrize("regime", ["long", "medium", "short"])
def test_unmix_within_3_points_of_truth(regime: str) -> None:
    unmix = errors(regime, "unmix")
    naive = errors(regime, "naive")
    assert max(unmix.values()) <= 0.03, unmix
    assert max(naive.values()) > 2 * max(unmix.values())


def test_8b_regime_decode_within_3_points_and_far_better_than_naive() -> None:
    unmix = errors("8b", "unmix")
    naive = errors("8b", "naive")
    assert max(v for (p, _), v in unmix.items() if p == Phase.DECODE) <= 0.03, unmix
    assert max(unmix.values()) <= 0.06, unmix
    assert max(naive.values()) >= 0.3 and max(naive.values()) > 5 * max(unmix.values())


def test_8b_regime_unmix_within_3_points_of_in_context_truth() -> None:
    context = TRUTH.get("context_truth", {})
    if "8b" not in context:
        pytest.skip("truth.json has no context_truth: the 8B fixture predates the in-context truth; record "
                    "on the GPU (bench/attribution_accuracy.py record --regimes 8b) and regenerate the "
                    "fixtures")
    windows = context["windows"]
    few = {ph.value: windows.get(ph.value, 0) for ph in Phase.busy()
           if windows.get(ph.value, 0) < MIN_CONTEXT_WINDOWS or ph.value not in context["8b"]}
    if few:
        pytest.skip(f"too few in-context truth windows in the 8B recording: {few} (need "
                    f"{MIN_CONTEXT_WINDOWS} per phase); record a longer 8B regime (--regime-s)")
    # the windows that make the truth are held out of the fixture the estimate reads
    trace = read_trace(FIXTURES / "regime_8b.jsonl")
    assert not set(context["held_out_t_ns"]) & {s.t_ns for s in trace.samples}
    unmix = errors("8b", "unmix", context["8b"])
    naive = errors("8b", "naive", context["8b"])
    assert len(unmix) == 9
    assert max(unmix.values()) <= 0.03, unmix
    assert max(naive.values()) > 5 * max(unmix.values())
