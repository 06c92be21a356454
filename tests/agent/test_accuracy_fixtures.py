"""Accuracy on the H100 ground-truth fixtures (tests/fixtures/attribution, made by
bench/attribution_accuracy.py on an NVIDIA H100 80GB HBM3: 30 s of each regime, GPM refreshes and CUDA-event
step intervals). Truth: the means of long pure runs of each phase (truth.json).

Figures of record (whole 45 s regimes) are in bench/RESULTS.md. On these fixtures unmix is within 0.03 of
the pure-run truth in the long, medium and short regimes. In the 8B-shaped regime it is not (about 0.05, on
prefill and mixed tensor activity): there a prefill chunk runs between decode steps at ~1800 MHz instead of
the ~1400 MHz the power cap allows a pure prefill run, and the duty-cycled truth runs at those clocks read the
same lower tensor activity unmix finds (truth.json, ``duty_truth``). That test asserts what holds: decode
within 0.03, the rest within 0.06, and naive far worse.
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


def errors(regime: str, method: str) -> dict[tuple[Phase, str], float]:
    trace = read_trace(FIXTURES / f"regime_{regime}.jsonl")
    assert trace.malformed == 0 and trace.meta is not None
    gpu = trace.meta.gpus[0]
    res = Attributor(AttributionConfig(method=method, horizon_s=60)).attribute(
        GpuIdentity(uuid=gpu.uuid, index=gpu.index, name=gpu.name), trace.steps, trace.samples)
    out = {}
    for phase in Phase.busy():
        for key in KEYS:
            truth = TRUTH["truth"][phase.value][key]
            out[(phase, key)] = abs(res.phases[phase].values[key] - truth) if phase in res.phases else 1.0
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
