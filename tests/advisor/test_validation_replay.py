"""Issue 8's prediction side replayed on the two-GPU measurements (tests/fixtures/validation), on CPU.

Measured on 2x H200 with llama-3.1-8b (bench/validate_advisor.py): the profile sweep, the 40-request sample
request log of each workload (what the advisor is given), and per workload the SLOs, the server's settings,
the measured goodput of colocated (two replicas) and split (one prefill, one decode) and every load run.
The prediction takes only the profile and the sample log (the TTFT and serving overheads are estimated from
the log), plus the settings the measurement states.

The measurement's goodput search ran load runs of a fixed length (12 s long, 20 s short; recovered here from
its runs as requests / rate): a short run lets a queue build less, so a TTFT-limited mode passes rates above
its steady-state goodput. The replay simulates runs of the same length (``run_s``) and averages seeds.

Two engine models:

* as measured: the engine's split decode worker took every handed-off sequence its KV cache held, past
  ``--max-num-seqs 64`` (up to 272 in the short run's step records: ``Scheduler.attach`` does not check
  the cap), and ran those batches without CUDA graphs (captured up to 64), eagerly: 13.8 ms of GPU time
  and a 4.5 ms host gap a step against 6.4 + 2.0 ms at batch 64. That is ``split_decode_cap=False``.
* as designed: decode workers hold to ``max_num_seqs``. Its split prediction for the short workload is a
  strict xfail until the engine caps its decode role and the short workload is measured again.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from phaselens.advisor.validate import Prediction, predict_goodput
from phaselens.cli import cli

FIXTURES = Path(__file__).parents[1] / "fixtures" / "validation"
PROFILE = FIXTURES / "profile_h200_8b.jsonl"
TOLERANCE = 0.15  # the acceptance: within 15% of measured
SEEDS = 8
MODES = ("colocated", "split")
#: the server's --max-num-seqs in both runs (bench/validate_advisor.py MAX_NUM_SEQS); the long run's advise
#: command predates passing it on
SERVER_MAX_NUM_SEQS = 64


def _measured(name: str) -> dict:
    return json.loads((FIXTURES / f"measured_{name}.json").read_text())


def _settings(m: dict) -> dict:
    """What the measurement states about the server, the link and its load runs."""
    max_seqs = re.search(r"--max-num-seqs (\d+)", m["advise_command"])
    runs = [r for rs in m["runs"].values() for r in rs]
    return dict(
        ttft_ms=m["workload"]["ttft_ms"], tpot_ms=m["workload"]["tpot_ms"], attainment=m["attainment"],
        gpus=m["gpus"], kv_link_gbps=m["link_bytes_per_s"] * 8 / 1e9, chunk_budget=m["chunk"],
        max_num_seqs=int(max_seqs.group(1)) if max_seqs else SERVER_MAX_NUM_SEQS,
        run_s=statistics.median(r["requests"] / r["rate"] for r in runs))


def _predict(name: str, **engine) -> Prediction:
    m = _measured(name)
    return predict_goodput(PROFILE, request_log=FIXTURES / f"requests_{name}_sample.jsonl", seeds=SEEDS,
                           **_settings(m), **engine)


@pytest.fixture(scope="module")
def replay() -> dict[str, dict]:
    out = {}
    for name in ("long", "short"):
        m = _measured(name)
        out[name] = {"measured": m["measured"], "as_measured": _predict(name, split_decode_cap=False),
                     "as_designed": _predict(name)}
    print("\nissue 8 replay (2x H200, llama-3.1-8b): predicted vs measured goodput, req/s")
    for name, r in out.items():
        for mode in MODES:
            meas = r["measured"][mode]
            cells = []
            for key in ("as_measured", "as_designed"):
                p = getattr(r[key], f"{mode}_rps")
                cells.append(f"{key} {p:6.2f} ({p / meas - 1:+.0%})")
            print(f"  {name:5s} {mode:9s} measured {meas:6.2f} | " + " | ".join(cells))
        gain = r["measured"]["split"] / r["measured"]["colocated"] - 1
        print(f"  {name:5s} verdict {r['as_measured'].verdict} (measured split gain {gain:+.1%}, margin "
              f"{r['as_measured'].advice.margin:.0%})")
    return out


def _measured_verdict(measured: dict, margin: float) -> str:
    """The advisor's rule on the measured goodputs: split only if it gains more than the margin."""
    return "split" if measured["split"] / measured["colocated"] - 1 > margin else "colocated"


@pytest.mark.parametrize("name", ["long", "short"])
def test_verdict_matches_the_measured_winner(replay, name):
    r = replay[name]
    for key in ("as_measured", "as_designed"):
        p = r[key]
        assert p.verdict == _measured_verdict(r["measured"], p.advice.margin), (key, p.to_dict())


@pytest.mark.parametrize("name,mode", [(n, m) for n in ("long", "short") for m in MODES])
def test_goodput_within_15_percent_with_the_engine_as_measured(replay, name, mode):
    r = replay[name]
    predicted, measured = getattr(r["as_measured"], f"{mode}_rps"), r["measured"][mode]
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


@pytest.mark.parametrize("name", [
    "long",
    pytest.param("short", marks=pytest.mark.xfail(strict=True, reason=(
        "measured split 31.1 req/s with the engine's decode role past max_num_seqs (batches up to 272, "
        "eager above 64); capped as designed the model predicts ~41 (+33%): re-measure once the decode "
        "role holds to max_num_seqs"))),
])
def test_split_goodput_within_15_percent_with_the_engine_as_designed(replay, name):
    r = replay[name]
    predicted, measured = r["as_designed"].split_rps, r["measured"]["split"]
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


def test_overheads_come_from_the_sample_log(replay):
    for name, r in replay.items():
        host = r["as_measured"].advice.model.host
        assert host.fitted and host.decode[0] > 0 and host.decode[1] > 0, name
        assert host.serving_source.startswith("serving overhead per step estimated"), name
        assert 0 < host.serving_s < 0.002, name  # a fraction of a millisecond per step, not a fitted knob
        assert 0 < r["as_measured"].advice.cluster.ttft_overhead_s < 0.1, name  # front-end time in TTFT


def test_phaselens_advise_gives_the_same_figures(replay):
    """The replay's command line (--run-seconds, --split-decode-uncapped) reports the same prediction."""
    p = replay["short"]["as_measured"]
    res = CliRunner().invoke(cli, p.command[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["predicted_goodput_rps"]["colocated"] == pytest.approx(p.colocated_rps, rel=1e-9)
    assert data["predicted_goodput_rps"]["split"] == pytest.approx(p.split_rps, rel=1e-9)
    assert data["verdict"] == p.verdict
