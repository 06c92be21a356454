"""advisor/validate.py: the prediction side of issue 8 on the checked-in H100 8B profile, on CPU.

Two GPUs at TP1, the issue's two workloads (about 4k/300 and 200/200 tokens, lognormal as the load generator
draws them), the server's chunk budget and sequence cap: predicted goodput of colocated (two replicas) and
split (one prefill, one decode), the verdict, and the same figures from ``phaselens advise --json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from phaselens.advisor.inputs import Cluster, InputError, Slo
from phaselens.advisor.screen import Placement, Screen
from phaselens.advisor.simulator import Simulator
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.validate import length_spec, predict_goodput
from phaselens.advisor.workload import Workload, _lengths
from phaselens.cli import cli
from phaselens.engine.config import preset
from phaselens.engine.loadgen import LengthDist
from phaselens.gpus import gpu_spec
from phaselens.trace import read_trace

PROFILE = Path(__file__).parents[1] / "fixtures" / "advisor" / "steps_h100_8b.jsonl"
LONG = dict(prompt=LengthDist(4000.0, 0.1, 3500, 4500), output=LengthDist(300.0, 0.1, 250, 350),
            ttft_ms=1500.0, tpot_ms=20.0)
SHORT = dict(prompt=LengthDist(200.0, 0.1, 150, 250), output=LengthDist(200.0, 0.1, 150, 250),
             ttft_ms=300.0, tpot_ms=20.0)
SERVER = dict(gpus=2, kv_link_gbps=400.0, chunk_budget=2048, max_num_seqs=64, attainment=0.9, seeds=1,
              n_requests=400)


@pytest.fixture(scope="module")
def predictions():
    return {name: predict_goodput(PROFILE, **wl, **SERVER) for name, wl in (("long", LONG), ("short", SHORT))}


@pytest.mark.parametrize("name", ["long", "short"])
def test_prediction_is_colocated_two_replicas_and_split_one_to_one(predictions, name):
    p = predictions[name]
    assert p.colocated_label == "colocated 2xTP1 chunk 2048"  # the server's own chunk budget
    assert p.split_label == "split P 1xTP1 : D 1xTP1"
    assert p.colocated_rps > 0 and p.split_rps > 0
    assert p.verdict in ("split", "colocated", "conditional")
    # judged at the load the two GPUs just carry colocated
    assert p.rate_rps == pytest.approx(p.colocated_rps)
    d = p.to_dict()
    assert d["split_gain"] == pytest.approx(p.split_rps / p.colocated_rps - 1)
    assert json.dumps(d)  # plain data for the validation's JSON


def test_long_prompts_favour_the_split_more_than_short_ones(predictions):
    # prefill work stalling decode steps grows with the prompt; a split removes exactly that
    assert predictions["long"].split_gain > predictions["short"].split_gain


@pytest.mark.parametrize("name", ["long", "short"])
def test_phaselens_advise_json_reports_the_same_figures(predictions, name):
    p = predictions[name]
    assert p.command[:2] == ["phaselens", "advise"]
    res = CliRunner().invoke(cli, p.command[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["predicted_goodput_rps"]["colocated"] == pytest.approx(p.colocated_rps, rel=1e-9)
    assert data["predicted_goodput_rps"]["split"] == pytest.approx(p.split_rps, rel=1e-9)
    assert data["finalists"]["split"]["label"] == p.split_label
    assert data["verdict"] == p.verdict


def test_lognormal_median_spec_draws_as_the_load_generator():
    dist = LengthDist(4000.0, 0.1, 3500, 4500)
    ours = _lengths(length_spec(dist), 500,
                    np.random.default_rng(7), "prompt", 131072)
    theirs = dist.sample(np.random.default_rng(7), 500)
    assert np.array_equal(ours, theirs)
    assert length_spec(200) == "fixed:200"
    assert length_spec((200.0, 0.5, 10, 400)) == "lognormal_median:200.0:0.5:10:400"
    wl = Workload.from_spec("rate=1,prompt=lognormal_median:200:0.5:10:400,output=fixed:8")
    assert wl.prompt_tokens.min() >= 10 and wl.prompt_tokens.max() <= 400


def test_chunk_budget_fixes_the_colocated_candidates():
    model = StepModel.fit(read_trace(PROFILE).steps, model=preset("llama-3.1-8b"))
    wl = Workload.from_spec("rate=4,prompt=fixed:2000,output=fixed:100")
    cl = Cluster(gpus=2, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"),
                 tp_degrees=(1,), chunk_budget=1024)
    sc = Screen(model, wl, Slo(1.0, 0.05), cl)
    assert {c.placement.chunk for c in sc.colocated()} == {1024}
    assert {c.placement.chunk for c in sc.conditional()} <= {1024}


def test_max_num_seqs_caps_the_simulated_batch():
    model = StepModel.fit(read_trace(PROFILE).steps, model=preset("llama-3.1-8b"))
    wl = Workload.from_spec("rate=1,prompt=fixed:100,output=fixed:200")
    slo = Slo(1.0, 0.05)
    base = dict(gpus=2, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"), tp_degrees=(1,))
    placements = {"split": Placement("split", 1, 1, 1, 1),
                  "colocated": Placement("colocated", 0, 0, 1, 1, chunk=512)}
    for kind, pl in placements.items():
        free = Simulator(model, wl, slo, Cluster(**base), pl, n_requests=300).run(80.0)
        capped = Simulator(model, wl, slo, Cluster(**base, max_num_seqs=16), pl, n_requests=300).run(80.0)
        assert free.step_batch.max() > 16, kind
        assert capped.step_batch.max() <= 16, kind


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="workload"):
        predict_goodput(PROFILE, ttft_ms=100.0, tpot_ms=20.0)
    with pytest.raises(ValueError, match="fixed length"):
        length_spec(0)
    with pytest.raises(InputError, match="chunk budget"):
        Cluster(gpus=2, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"), chunk_budget=-1)
    with pytest.raises(InputError, match="max sequences"):
        Cluster(gpus=2, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"), max_num_seqs=0)
