"""Golden test: DistServe's published OPT-13B / A100 result (OSDI'24; LLMServe/DistServe simdistserve README).

Published reference (figures and facts only, no code taken):

* latency coefficients: ``simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json``, OPT-13B,
  TP 1/2/4, milliseconds: prefill ``a + b*sum(l) + c*sum(l^2)``, decode ``a + b*context + c*batch`` with a
  separate line at batch >= 95 (the same forms as our step model);
* the per-step extras of the simulator that printed the figure. The README's "Best per GPU rate: 1.56" is
  already in the artifact-evaluation snapshot (commit f06659fe), whose simulator adds to every step, on top
  of the coefficients, a "Ray overhead" of 2 ms + 0.0001 ms per context token (``worker.py``), and to a
  prefill step a further 1 ms (``time_estimator.py``, ``pp_const`` at PP1). Later commits dropped both; the
  README kept the figure. They are linear in the same features, so they are added to the coefficients
  (``ae_step_extras_ms`` of ``distserve_opt13b_a100.json``, added by :func:`published_table`);
* KV capacity: ``max_num_tokens.csv`` (OPT-13B, PP1): 66,144 tokens at TP1, 163,008 at TP2;
* SLOs and search (README, ``simulate.py``, ``benchmarks/search_binary.py``, ``simulate_dist.py``): one node
  of 4 x A100-80GB, P90 TTFT 200 ms and P90 TPOT 100 ms checked *separately* (``quantile(0.9) < target`` for
  each), Poisson arrivals, ShareGPT, ``--N 300`` requests per run, seed 0 only; the candidates are one prefill
  plus one decode instance, rated by ``rate / (tp_prefill + tp_decode)``; bisection of the per-GPU rate on
  [0, 5] until the bracket is under 0.25 wide, reporting its lower end. Reported: "Best per GPU rate: 1.56",
  "tp_prefill=2, tp_decode=1", i.e. the bracket [1.5625, 1.71875).
* what their simulator's latencies mean: TTFT is arrival to the end of the prefill (no front-end time), TPOT
  is a request's decode time over its output length (a per-request mean, as ours), no KV transfer time, and
  no KV-capacity limit on decode workers beyond a cap on a decode step's summed context (50,000 tokens in
  the snapshot above).

Assumptions standing in for what is not public in usable form:

* the workload: the simulator samples 300 requests (seed 0) from DistServe's preprocessed ShareGPT file, which
  is not published. 657 requests of the same preprocessing (OPT-13B tokenizer, prompt + output < 2048) from
  DistServe's alignment traces stand in for it (``tests/fixtures/advisor/distserve_opt13b_sharegpt_657.json``:
  mean prompt 757, mean output 186 tokens);
* the model shape (only KV bytes per token and weight bytes matter here): OPT-13B, 40 layers, hidden 5120,
  40 heads without GQA, the MLP's 2 x 4h matrices expressed as our 3-matrix form (intermediate 13653);
* the KV link: intra-node NVLink (600 GB/s per GPU), so the hand-off costs about a millisecond.

Where ours differs on purpose (each makes ours *more* conservative than their simulator): decode workers admit
a request only while its whole context fits the KV cache, and a decode worker runs at its own TP (their
``simulate_dist.py`` builds every worker with ``TP_Decode=TP_Prefill``).

Results (the issue asks for both the placement and its goodput within 15%):

* the goodput of DistServe's reported placement, one TP2 prefill and one TP1 decode instance, simulated by
  ours in steady state and rated per GPU of those 3 GPUs as theirs: 1.65 req/s per GPU, +6% over 1.56
  (passes; without the snapshot's per-step extras it is 1.88, +20%). Before the search measured a steady
  window (advisor/search.py) it read 1.72: 1,000 requests from an empty system;
* the placement is *not* what our search picks (``test_search_finds_distserve_placement_and_goodput`` is a
  strict xfail). Over the whole cluster it prefers split P 2 x TP1 : D 2 x TP1 at 2.05 req/s per GPU
  simulated (1 x TP2 : 2 x TP1 is 1.77), a shape DistServe's search (one instance per phase) cannot
  express. Before the screen modelled a prefill pool as one M/G/c queue it scored 2 x TP1 prefill as two
  separate queues, 1.10 req/s per GPU, never simulated it, and picked TP2 / TP1: that match was an
  artefact. Within DistServe's candidates ours ranks TP2 / TP2 (1.77) above TP2 / TP1 (1.65): our TP1 decode
  worker runs out of KV cache at about 5 req/s, while their ``simulate_dist.py`` runs the decode worker at
  the prefill worker's TP (a TP2 decode, rated as one GPU), so their TP2 / TP1 and TP2 / TP2 are the same
  simulation, the first rated over fewer GPUs.

The published figure is
one 300-request run at one seed, and such a run is noisy: P90 TTFT binds, and the P90 of 300 TTFTs at a
given rate swings with the sample's share of long prompts and the arrivals' bursts. DistServe's procedure
replayed with the snapshot's semantics (``bench/distserve_procedure.py``: per-step extras, one batch of every
queued prompt, the 50,000-token decode cap, no KV limit, no front-end time, free link) on this workload over
400 seeds finds a median of 2.34 req/s per GPU (P10 1.88, range 1.41 to 3.59), decode at TP1 or TP2 alike
(TTFT binds); the published bracket [1.5625, 1.71875) came up in 7 of 400. Their seed-0
sample is unknown, so the published number cannot be reproduced more closely without choosing a workload
to fit it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.search import Search
from phaselens.advisor.step_model import StepModel, kv_capacity_tokens
from phaselens.advisor.workload import Workload
from phaselens.engine.config import ModelConfig
from phaselens.gpus import gpu_spec
from tests.bench_module import load_bench

FIXTURE = Path(__file__).parents[1] / "fixtures" / "advisor" / "distserve_opt13b_sharegpt_657.json"

# coefficients, the snapshot's per-step extras and the published result, with their provenance
PUBLISHED = json.loads((FIXTURE.parent / "distserve_opt13b_a100.json").read_text())
DISTSERVE_OPT13B_A100_MS = {int(tp): row for tp, row in PUBLISHED["coefficients_ms"].items()}
PUBLISHED_PER_GPU = PUBLISHED["published"]["per_gpu_rps"]
ACCEPTANCE = 0.15

OPT_13B = ModelConfig(
    name="opt-13b",
    vocab_size=50272,
    hidden_size=5120,
    intermediate_size=13653,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    max_position_embeddings=2048,
)


def published_table() -> dict[int, dict]:
    """The coefficients with the snapshot's per-step extras added (same features: intercept, tokens), as
    the replay of DistServe's procedure steps them (bench/distserve_procedure.py)."""
    replay = load_bench("distserve_procedure")
    table: dict[int, dict] = {}
    for tp in DISTSERVE_OPT13B_A100_MS:
        steps = replay.PublishedSteps(PUBLISHED, tp)
        table[tp] = {"prefill": list(steps.prefill), "decode": list(steps.decode),
                     "decode_large": list(steps.decode_large), "knee": steps.knee}
    return table


@pytest.fixture(scope="module")
def search():
    pairs = np.array(json.loads(FIXTURE.read_text())["prompt_output"])
    model = StepModel.from_table(published_table(), unit_s=1e-3)
    workload = Workload.from_arrays(4.0, pairs[:, 0], pairs[:, 1], source="DistServe ShareGPT sample")
    # separate P90 checks, as DistServe's search (simulate_dist.py); a joint 90% gives the same figure here
    slo = Slo(ttft_s=0.200, tpot_s=0.100, ttft_pct=90, tpot_pct=90)
    cluster = Cluster(
        gpus=4,
        gpu=gpu_spec("NVIDIA A100-SXM4-80GB"),
        model=OPT_13B,
        gpus_per_node=4,
        kv_link_gbps=4800.0,
        tp_degrees=(1, 2, 4),
        # their simulated TTFT has no front-end time (organize_data.py: arrival to the end of the prefill)
        ttft_overhead_s=0.0,
    )
    return Search(model, workload, slo, cluster, seeds=(0, 1, 2), n_requests=1000)


@pytest.fixture(scope="module")
def advice(search):
    return search.run()


def test_workload_sample_is_distserve_sharegpt_shape():
    pairs = np.array(json.loads(FIXTURE.read_text())["prompt_output"])
    # DistServe's preprocessing keeps prompt + output < 2048 (OPT's position table)
    assert len(pairs) == 657 and int((pairs.sum(axis=1) >= 2048).sum()) == 0
    assert 700 < pairs[:, 0].mean() < 800 and 150 < pairs[:, 1].mean() < 220


def test_kv_capacity_close_to_distserve_figures():
    a100 = gpu_spec("NVIDIA A100-SXM4-80GB")
    # our estimate (90% of memory minus weights) against DistServe's max_num_tokens.csv
    published = PUBLISHED["max_num_tokens"]
    assert kv_capacity_tokens(OPT_13B, a100, 1) == pytest.approx(published["1"], rel=0.1)
    assert kv_capacity_tokens(OPT_13B, a100, 2) == pytest.approx(published["2"], rel=0.1)


def test_distserve_placement_goodput_within_15_percent_of_published(search):
    sc = search.screen()
    # one TP2 prefill and one TP1 decode instance, rated per GPU of those 3 GPUs, as DistServe's search rates
    cand = sc.split_candidate(2, 1, 1, 1)
    per_gpu = search.finalize(cand).per_gpu
    assert abs(per_gpu / PUBLISHED_PER_GPU - 1.0) <= ACCEPTANCE, (per_gpu, per_gpu / PUBLISHED_PER_GPU)


@pytest.mark.xfail(
    strict=True,
    reason="the search prefers split P 2xTP1 : D 2xTP1 (2.05 req/s per GPU, +31%), a shape outside "
    "DistServe's one-instance-per-phase search; see the module docstring",
)
def test_search_finds_distserve_placement_and_goodput(advice):
    pl = advice.split.placement
    # DistServe rates one prefill + one decode instance; ours sizes the pools over the 4 GPUs, so the fourth
    # GPU may hold a second decode instance of the same shape
    assert (pl.n_p, pl.tp_p, pl.tp_d) == (1, 2, 1), pl.label
    per_gpu = advice.split.per_gpu
    assert abs(per_gpu / PUBLISHED_PER_GPU - 1.0) <= ACCEPTANCE, (per_gpu, per_gpu / PUBLISHED_PER_GPU)
