"""Scenarios whose direction is known (issue 5): the verdict and the computed reason that explains it.

Step times are an 8B-on-H100-like model with known coefficients (tests/advisor/synth.py); TP2 is
extrapolated from it, as the advisor does for a TP1 trace.
"""

from __future__ import annotations

import pytest

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.search import Advice, Search
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import Workload
from phaselens.engine.config import preset
from phaselens.gpus import gpu_spec

from .synth import TRUE

LONG = "rate=30,prompt=lognormal:6000:0.3,output=lognormal:300:0.5"
LONG_SLO = Slo(ttft_s=4.0, tpot_s=0.020)  # tight TPOT, loose TTFT


def advise(spec: str, slo: Slo, gpus: int, link_gbps: float = 400.0) -> Advice:
    model = StepModel.from_table(
        {
            1: {
                "prefill": TRUE["prefill"],
                "decode": TRUE["decode"],
                "decode_large": TRUE["decode_large"],
                "knee": TRUE["knee"],
            }
        },
        source="synthetic",
    )
    cluster = Cluster(
        gpus=gpus,
        gpu=gpu_spec("NVIDIA H100 80GB HBM3"),
        model=preset("llama-3.1-8b"),
        kv_link_gbps=link_gbps,
        tp_degrees=(1, 2),
    )
    return Search(model, Workload.from_spec(spec), slo, cluster, seeds=(0,), n_requests=600).run()


def reason(advice: Advice, code: str):
    found = [r for r in advice.reasons if r.code == code]
    assert found, [r.code for r in advice.reasons]
    r = found[0]
    # the number that decided it is printed in the reason
    shown = (f"{r.value:.0%}", f"{r.value:+.0%}", f"{r.value:g}")
    assert any(s in r.text for s in shown), r.text
    return r


def test_short_prompts_on_4_gpus_stay_colocated():
    advice = advise("rate=20,prompt=lognormal:120:0.5,output=lognormal:80:0.5", Slo(0.2, 0.05), gpus=4)
    assert advice.verdict == "colocated"
    assert advice.gain < advice.margin
    assert reason(advice, "short_prompts").triggered


def test_long_prompts_tight_tpot_on_48_gpus_split_with_a_sensible_ratio():
    advice = advise(LONG, LONG_SLO, gpus=48)
    assert advice.verdict == "split", (advice.gain, advice.robustness)
    assert advice.gain > advice.margin
    pl = advice.split.placement
    assert pl.gpus <= 48
    # long prompts, modest outputs: the prefill pool is the bigger one ...
    assert pl.n_p * pl.tp_p > pl.n_d * pl.tp_d
    # ... and the pools are balanced: neither could lose an instance and keep up with the other
    d = advice.split.candidate.details
    gp, gd = d["prefill_instance_goodput"], d["decode_instance_goodput"]
    assert abs(pl.n_p * gp - pl.n_d * gd) <= max(gp, gd)
    assert not reason(advice, "slo_shape").triggered
    assert advice.gpus_needed["split"] < advice.gpus_needed["colocated"]


def test_heavy_prefix_reuse_is_not_split():
    advice = advise(LONG + ",multi_turn=0.9,history=0.9,prefix_hit=0.1", LONG_SLO, gpus=48)
    assert advice.verdict in ("colocated", "conditional")
    assert reason(advice, "prefix_reuse_decode_side").triggered


def test_1_gbps_kv_link_is_not_split():
    advice = advise(LONG, LONG_SLO, gpus=48, link_gbps=1.0)
    assert advice.verdict != "split"
    r = reason(advice, "slow_kv_link")
    assert r.triggered and r.value > 0.5


@pytest.mark.parametrize("gpus", [1])
def test_one_gpu_cannot_split(gpus):
    advice = advise(LONG, LONG_SLO, gpus=gpus)
    assert advice.verdict == "colocated"
    assert reason(advice, "too_few_gpus").triggered
