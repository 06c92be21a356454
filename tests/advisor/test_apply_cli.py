"""`phaselens advise --apply`: the verdict is performed on a live engine through its admin API, verified."""

from __future__ import annotations

import json

import httpx
import numpy as np
from click.testing import CliRunner

from phaselens.advisor.apply import apply_recommendation
from phaselens.cli import cli
from tests.engine.server_harness import LiveServer, handoff_fake_workers

from .synth import synth_steps, write_request_log, write_trace

TOKEN = "apply-test-token"


def test_advise_apply_switches_the_engine_to_the_verdict(tmp_path, monkeypatch) -> None:
    trace = write_trace(tmp_path / "trace.jsonl", synth_steps(n_mixed=20))
    rng = np.random.default_rng(0)
    log = write_request_log(tmp_path / "requests.jsonl", rng.integers(100, 400, 300),
                            rng.integers(20, 200, 300), rate=4.0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ["advise", "--trace", str(trace), "--request-log", str(log), "--preset", "llama-3.1-8b",
            "--gpus", "2", "--tp", "1", "--ttft-ms", "1000", "--tpot-ms", "60", "--seeds", "1",
            "--requests", "300", "--html", ""]
    runner = CliRunner()
    first = runner.invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    verdict = json.loads(first.output)["verdict"]
    with LiveServer(handoff_fake_workers(2), admin_token=TOKEN) as server:
        # start from the other mode than the verdict's, so that applying it is a change
        start = "colocated" if verdict == "split" else "split"
        assert apply_recommendation(server.url, TOKEN, start, prefill=1, decode=1).ok
        res = runner.invoke(cli, [*args, "--apply", "--engine", server.url, "--token-file", str(token_file)])
        state = httpx.get(f"{server.url}/admin/mode", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        if verdict == "conditional":
            assert res.exit_code == 1 and "no conditional mode" in res.output
            assert state["mode"] == start
        else:
            assert res.exit_code == 0, res.output
            assert "applied:" in res.output and state["mode"] == verdict
        bad = runner.invoke(cli, [*args, "--apply", "--engine", server.url],
                            env={"PHASELENS_ADMIN_TOKEN": ""})
        assert bad.exit_code == 2 and "PHASELENS_ADMIN_TOKEN" in bad.output
