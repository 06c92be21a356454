"""bench/validate_advisor.py on CPU, without a server: configurations, the report, the prediction side.

The script measures on N GPUs (issue 8: two, issue 11: four); here its parts that need no GPU: ``--configs``
parsing and the ``POST /admin/mode`` bodies, the report's comparison (errors, rank orders, issue 11's top-two
rule) and Markdown, merging calls measured apart, the end of a goodput search, and ``--predict-only`` on the
checked-in H200 long-workload profile and sample log (the pre-registered prediction's command).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tests.bench_module import load_bench

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "validation"

va = load_bench("validate_advisor")


def test_configs_default_to_every_placement_and_two_gpus_stay_issue_8s():
    assert va.parse_configs(None, 2) == ["colocated", "1:1"]
    assert va.parse_configs(None, 4) == ["colocated", "1:3", "2:2", "3:1"]
    assert va.parse_configs(" 2:2, colocated ", 4) == ["2:2", "colocated"]
    assert [va.mode_key(c, 2) for c in va.parse_configs(None, 2)] == ["colocated", "split"]
    assert [va.mode_key(c, 4) for c in va.parse_configs(None, 4)] == ["colocated", "1:3", "2:2", "3:1"]
    for bad, match in (("2:2", "not a configuration of 2 GPUs"), ("colocated,colocated", "twice"),
                       (",", "no configuration"), ("split", "not a configuration")):
        with pytest.raises(click.BadParameter, match=match):
            va.parse_configs(bad, 2)


def test_mode_bodies():
    assert va.mode_body("colocated") == {"mode": "colocated"}
    assert va.mode_body("3:1") == {"mode": "split", "prefill": 3, "decode": 1}
    assert va.split_counts("1:3") == (1, 3) and va.split_counts("colocated") is None


def _run(rate: float, ok: bool) -> dict[str, Any]:
    return {"rate": rate, "attainment": 1.0 if ok else 0.5, "passes": ok}


def test_a_search_is_closed_when_its_bracket_is_within_8_percent():
    assert va.search_closed([_run(10.0, True), _run(14.0, False), _run(12.0, False), _run(11.0, False),
                             _run(10.5, True)])
    assert not va.search_closed([_run(10.0, True), _run(14.0, False)])  # 40% apart: cut short
    assert not va.search_closed([_run(10.0, False), _run(7.0, False)])  # nothing passed
    assert not va.search_closed([_run(10.0, True), _run(14.0, True)])  # no upper end
    runs = [_run(10.0, True), _run(14.0, False), _run(12.0, False), _run(9.0, False)]
    assert va.bracket(runs) == (10.0, 12.0)
    assert va.bracket([_run(10.0, False)]) == (0.0, 10.0)


def _report(gpus: int, measured: dict[str, float], predicted: dict[str, float], **extra: Any) -> dict:
    wl = va.WORKLOADS["long"]
    runs = {k: [_run(v, True) | {"itl_p99_s": 0.02}] for k, v in measured.items()}
    r = {"workload": wl.__dict__, "gpu": "NVIDIA H200", "device": "cuda", "gpus": gpus,
         "preset": "llama-3.1-8b", "chunk": 2048, "attainment": 0.9, "link_bytes_per_s": 3.8e11,
         "predicted": {"colocated": predicted.get("colocated"), "split": max(predicted.values()),
                       "colocated_label": f"colocated {gpus}xTP1 chunk 2048",
                       "split_label": "split P 1xTP1 : D 1xTP1", "verdict": "colocated"},
         "advise_command": "phaselens advise ...", "predicted_configs": dict(predicted),
         "predicted_labels": {k: f"label {k}" for k in predicted},
         "predict_settings": {"seeds": 8, "run_s": 12.0, "kv_link_gbps": 3040.0, "profile": "p",
                              "request_log": "l"},
         "measured": dict(measured), "runs": runs,
         "same_load": {k: {"rate": 6.0, "itl_p50_s": 0.008, "itl_p99_s": 0.06} for k in measured},
         "wall_s": 283.0, "finished": "2026-11-23 04:57 UTC", **extra}
    va.judge(r)
    return r


def test_the_four_gpu_report_ranks_and_judges_the_top_two():
    pred = {"colocated": 17.75, "1:3": 9.01, "2:2": 18.36, "3:1": 16.44}
    r = _report(4, {"colocated": 16.0, "1:3": 9.5, "2:2": 19.2, "3:1": 15.0}, pred)
    assert r["measured_rank"] == ["2:2", "colocated", "3:1", "1:3"] == r["predicted_rank"]
    assert r["top_two_match"] is True
    assert r["errors"]["colocated"] == pytest.approx(17.75 / 16.0 - 1)
    text = va.markdown(r)
    assert "on 4x NVIDIA H200" in text and "--workers 4" in text
    assert "| config | predicted req/s | measured req/s (first failing rate above) | error |" in text
    assert "| 2:2 (label 2:2) | 18.36 | 19.20 (no run failed) | -4% |" in text
    assert ("rank predicted 2:2 > colocated > 3:1 > 1:3; measured 2:2 > colocated > 3:1 > 1:3: top two match"
            in text)
    assert "taken for every prefill -> decode pair of the 4" in text
    assert "measured winner **2:2**" in text
    r = _report(4, {"colocated": 19.0, "1:3": 9.5, "2:2": 18.0, "3:1": 15.0}, pred)
    assert r["top_two_match"] is False and "top two do not match" in va.markdown(r)
    # a call cut short by its time budget: what it measured, and what it did not
    r = _report(4, {"2:2": 19.2}, pred, cut_short=["2:2", "colocated", "3:1"])
    text = va.markdown(r)
    assert r["top_two_match"] is None and "no order to match" in text
    assert "not measured (the call's time budget was spent): colocated, 3:1" in text
    assert "2:2 runs (rate:attainment): 19.20:1.00+ (cut short by the time budget)" in text


def test_the_two_gpu_report_keeps_issue_8s_keys():
    r = _report(2, {"colocated": 7.99, "split": 9.19}, {"colocated": 8.61, "split": 8.86})
    assert set(r["measured"]) == {"colocated", "split"} and set(r["runs"]) == {"colocated", "split"}
    text = va.markdown(r)
    assert "same load (6.00 req/s): ITL p50/p99 colocated 8.0/60.0 ms, split 8.0/60.0 ms" in text
    assert "against colocated: split +15%" in text
    assert "taken for every" not in text


def test_calls_measured_apart_combine_into_one_report(tmp_path):
    pred = {"colocated": 17.75, "1:3": 9.01, "2:2": 18.36, "3:1": 16.44}
    a = _report(4, {"colocated": 16.0, "2:2": 19.2}, {k: pred[k] for k in ("colocated", "2:2")})
    b = _report(4, {"1:3": 9.5, "3:1": 15.0}, {k: pred[k] for k in ("1:3", "3:1")}, wall_s=200.0)
    b["predict_settings"]["kv_link_gbps"] = 3000.0  # measured per call
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    c = va.combine([tmp_path / "a.json", tmp_path / "b.json"])
    assert c["measured_rank"] == ["2:2", "colocated", "3:1", "1:3"] and c["top_two_match"] is True
    assert c["calls"] == 2 and c["wall_s"] == 483.0
    assert "over 2 calls" in va.markdown(c)
    args = ["--combine", str(tmp_path / "a.json"), "--combine", str(tmp_path / "b.json"),
            "--out-dir", str(tmp_path / "c"), "--results", str(tmp_path / "R.md")]
    res = CliRunner().invoke(va.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "validate_long.json").read_text())["top_two_match"] is True
    assert "over 2 calls" in (tmp_path / "R.md").read_text()
    b["chunk"] = 1024
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(click.ClickException, match="chunk differs"):
        va.combine([tmp_path / "a.json", tmp_path / "b.json"])


def test_predict_only_on_the_h200_fixtures(tmp_path):
    """The pre-registration's command (one seed here): every configuration of four GPUs, no server."""
    results = tmp_path / "RESULTS.md"
    res = CliRunner().invoke(va.main, [
        "--predict-only", "--workload", "long", "--gpus", "4",
        "--profile", str(FIXTURES / "profile_h200_8b_long.jsonl"),
        "--sample-log", str(FIXTURES / "requests_long_sample.jsonl"),
        "--link-bytes-per-s", "380360538131.12616", "--run-seconds", "12", "--predict-seeds", "1",
        "--out-dir", str(tmp_path), "--results", str(results)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "predict_long.json").read_text())
    assert list(r["predicted_configs"]) == ["colocated", "1:3", "2:2", "3:1"]
    assert all(v > 0 for v in r["predicted_configs"].values())
    assert r["advise_agrees"] is True  # phaselens advise's finalists are predict_goodput's
    assert r["advisor_gpu"] == "NVIDIA H200"
    assert r["predict_settings"]["kv_link_gbps"] == pytest.approx(380360538131.12616 * 8 / 1e9)
    text = results.read_text()
    assert "advisor prediction (G=4, long workload, llama-3.1-8b), made before any 4-GPU measurement" in text
    assert "| 2:2 | split P 2xTP1 : D 2xTP1 |" in text
    assert len(r["predicted_by_seed"]["2:2"]) == 1
    with pytest.raises(click.BadParameter, match="needs --profile and --sample-log"):
        CliRunner().invoke(va.main, ["--predict-only", "--workload", "long", "--out-dir", str(tmp_path)],
                           catch_exceptions=False, standalone_mode=False)
