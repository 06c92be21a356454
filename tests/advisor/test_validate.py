"""advisor/validate.py: the prediction side of issues 8 and 11 on the checked-in H100 8B profile, on CPU.

Two GPUs at TP1, the issue's two workloads (about 4k/300 and 200/200 tokens, lognormal as the load generator
draws them), the server's chunk budget and sequence cap: predicted goodput of colocated (two replicas) and
split (one prefill, one decode), the verdict, and the same figures from ``phaselens advise --json``. Four
GPUs (issue 11): every placement simulated (colocated, 1:3, 2:2, 3:1), and the ranking rule.
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
from phaselens.advisor.search import Search
from phaselens.advisor.validate import (length_spec, placement_name, placement_names,
                                        predict_goodput, rank, top_two_match)
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


# ---------------------------------------------------------------------- every placement (issue 11)

FOUR = dict(SERVER, gpus=4, n_requests=200)


@pytest.fixture(scope="module")
def four_gpus():
    return predict_goodput(PROFILE, **LONG, **FOUR, every_placement=True)


def test_every_placement_of_four_gpus_is_simulated(four_gpus):
    p = four_gpus
    assert list(p.placements) == ["colocated", "1:3", "2:2", "3:1"] == placement_names(4)
    assert p.placement_labels == {"colocated": "colocated 4xTP1 chunk 2048", "1:3": "split P 1xTP1 : D 3xTP1",
                                  "2:2": "split P 2xTP1 : D 2xTP1", "3:1": "split P 3xTP1 : D 1xTP1"}
    assert all(v > 0 for v in p.placements.values())
    assert {k: len(v) for k, v in p.placement_by_seed.items()} == dict.fromkeys(p.placements, 1)
    # the finalists are the same simulations, not a second run of them
    assert p.placements["colocated"] == p.colocated_rps
    assert p.split_label in p.placement_labels.values()
    assert p.placements[next(k for k, v in p.placement_labels.items() if v == p.split_label)] == p.split_rps
    # 4k-token prompts on one prefill GPU: TTFT-bound at about one GPU's prefill rate, below an even split
    assert p.placements["1:3"] < p.placements["2:2"]
    d = p.to_dict()
    assert d["placements"] == p.placements and d["ranking"] == rank(p.placements)
    assert json.dumps(d)


def test_every_placement_is_off_by_default(predictions):
    assert predictions["long"].placements == {} and predictions["long"].placement_labels == {}


def test_a_placement_the_screen_passed_over_starts_from_the_screens_arithmetic():
    """``Screen.split_candidate`` restates the screen's integer-split arithmetic for one given split: on the
    split the screen picks, it gives the screen's own candidate (so every placement is bracketed alike)."""
    model = StepModel.fit(read_trace(PROFILE).steps, model=preset("llama-3.1-8b"))
    wl = Workload.from_spec("rate=4,prompt=lognormal_median:4000:0.1:3500:4500,output=fixed:300")
    for gpus in (2, 3, 4, 6):
        cl = Cluster(gpus=gpus, gpu=gpu_spec("NVIDIA H100 80GB HBM3"), model=preset("llama-3.1-8b"),
                     tp_degrees=(1,), chunk_budget=2048, max_num_seqs=64)
        sc = Search(model, wl, Slo(1.5, 0.02, attainment=0.9), cl).screen()
        best = sc.split()[0]
        mine = sc.split_candidate(1, best.placement.n_p, 1, best.placement.n_d)
        assert mine.placement == best.placement
        assert (mine.goodput, mine.per_gpu, mine.ideal_per_gpu) == pytest.approx(
            (best.goodput, best.per_gpu, best.ideal_per_gpu), rel=1e-12), gpus
        assert mine.limit == best.limit and mine.details.keys() == best.details.keys()
        assert placement_name(mine.placement) == f"{best.placement.n_p}:{best.placement.n_d}"


def test_placement_names_and_the_ranking_rule():
    assert placement_names(2) == ["colocated", "1:1"]
    assert placement_names(8, tp=2) == ["colocated", "1:3", "2:2", "3:1"]
    with pytest.raises(ValueError, match="TP4"):
        placement_names(2, tp=4)
    pred = {"colocated": 17.7, "1:3": 9.0, "2:2": 18.4, "3:1": 16.4}
    assert rank(pred) == ["2:2", "colocated", "3:1", "1:3"]
    assert rank({"a": None, "b": 1.0}) == ["b", "a"]
    # the top two in order; the rest may differ
    assert top_two_match(pred, {"colocated": 16.0, "1:3": 12.0, "2:2": 19.0, "3:1": 11.0})
    assert not top_two_match(pred, {"colocated": 19.0, "1:3": 9.0, "2:2": 18.0, "3:1": 11.0})
    assert not top_two_match(pred, {"colocated": 16.0, "1:3": 9.0, "2:2": 19.0, "3:1": 17.0})
    # over the configurations measured (a call that measured some of them)
    assert top_two_match(pred, {"colocated": 16.0, "3:1": 15.0})
    with pytest.raises(ValueError, match="at least two"):
        top_two_match(pred, {"colocated": 16.0})
    with pytest.raises(ValueError, match="conditional"):
        placement_name(Placement("conditional", 1, 1, 1, 1, chunk=2048, threshold=100))
