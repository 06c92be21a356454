"""``phaselens serve``'s split-mode and admin flags are checked before anything starts; engine metrics of
the hand-off."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from phaselens.engine.metrics import EngineMetrics
from phaselens.engine.serve_cli import serve


@pytest.mark.parametrize("args,needle", [
    (["--mode", "split"], "--mode split needs --prefill N and --decode N"),
    (["--mode", "split", "--prefill", "1", "--decode", "2", "--workers", "2"], "--workers is 2"),
    (["--prefill", "1", "--decode", "1"], "apply to --mode split only"),
    (["--mode", "split", "--prefill", "0", "--decode", "1"], "--prefill"),
    (["--mode", "sideways"], "'sideways'"),
    (["--admin-token-file", "/no/such/token"], "cannot read '/no/such/token'"),
])
def test_serve_rejects_bad_mode_flags_naming_the_value(args, needle, monkeypatch) -> None:
    monkeypatch.delenv("PHASELENS_ADMIN_TOKEN", raising=False)
    result = CliRunner().invoke(serve, args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_empty_token_file_is_refused(tmp_path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = CliRunner().invoke(serve, ["--admin-token-file", str(empty)])
    assert result.exit_code == 2 and "is empty" in result.output and "--admin-token-file" in result.output


def test_kv_transfer_metrics() -> None:
    m = EngineMetrics("tiny", hostname="h")
    m.observe_kv_transfer("decode", 0.002, 4096)
    m.observe_kv_transfer("decode", 0.004, 1024)
    text = m.render().decode()
    labels = 'hostname="h",model_name="tiny",role="decode"'
    assert f"phaselens_engine_kv_transfer_seconds_count{{{labels}}} 2.0" in text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if f.name.startswith("phaselens_engine_kv_transfer")}
    assert samples[("phaselens_engine_kv_transfer_seconds_bucket", "0.0025")] == 1
    assert samples[("phaselens_engine_kv_transfer_seconds_sum", None)] == pytest.approx(0.006)
    assert samples[("phaselens_engine_kv_transfer_bytes_total", None)] == 5120
