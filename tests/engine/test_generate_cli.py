"""``phaselens generate``: output, and usage errors that name the bad value (never a traceback)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from phaselens.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, ["generate", *args])


def test_generate_prints_text_and_phase_table(tmp_path) -> None:
    jsonl = tmp_path / "steps.jsonl"
    res = invoke("--preset", "tiny", "--prompt", "Hello", "--prompt", "a longer second prompt",
                 "--max-tokens", "5", "--ignore-eos", "--shim-jsonl", str(jsonl),
                 "--shim-socket", str(tmp_path / "no.sock"))
    assert res.exit_code == 0, res.output
    assert "--- prompt 2" in res.output
    assert res.output.count("5 output tokens, finish: length") == 2
    lines = {line.split()[0]: line.split()[1:] for line in res.output.splitlines()
             if line.split() and line.split()[0] in ("prefill", "decode", "mixed")}
    assert int(lines["prefill"][0]) >= 1 and int(lines["decode"][0]) >= 1
    records = [json.loads(x) for x in jsonl.read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == sum(int(v[0]) for v in lines.values())


def test_generate_same_greedy_text_twice() -> None:
    a = invoke("--prompt", "abc", "--max-tokens", "6", "--no-shim")
    b = invoke("--prompt", "abc", "--max-tokens", "6", "--no-shim", "--max-num-batched-tokens", "2")
    assert a.exit_code == b.exit_code == 0
    assert a.output.splitlines()[0] == b.output.splitlines()[0]


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "'nope'"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--temperature", "3"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--max-tokens", "0"], "max_tokens"),
    ([f"--stop={c}" for c in "abcdefghijklmnopq"], "Invalid value for '--stop'"),
    (["--max-tokens", "5000"], "5000"),
    (["--device", "tpu"], "'tpu'"),
    (["--num-kv-blocks", "0"], "num_kv_blocks"),
    (["--preset", "tiny", "--model", "x"], "not both"),
    (["--preset", "llama-3.1-70b"], "GiB of weights"),  # 263 GiB in float32: no CPU machine here has that
])
def test_usage_errors_name_the_value(args: list[str], needle: str) -> None:
    res = invoke("--prompt", "hi", "--no-shim", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (ValueError, RuntimeError))


def test_prompt_longer_than_the_context(tmp_path) -> None:
    res = invoke("--prompt", "x" * 100, "--num-kv-blocks", "4", "--max-tokens", "1", "--no-shim")
    assert res.exit_code == 2
    assert "exceeds the context of 64 tokens" in res.output


def test_malformed_model_folder(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{nope")
    res = invoke("--model", str(tmp_path), "--prompt", "hi", "--no-shim")
    assert res.exit_code == 2
    assert "config.json: not valid JSON" in res.output
