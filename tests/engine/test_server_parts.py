"""The front-end's parts without processes: router, text streaming, chat template, request log, metrics,
and `phaselens serve`'s start-up checks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from phaselens.engine.metrics import EngineMetrics
from phaselens.engine.request_log import RequestLog, RequestRecord, read_request_log
from phaselens.engine.router import NoWorkerAvailable, Router
from phaselens.engine.serve_cli import serve
from phaselens.engine.server import ChatMessage, _TextStream, apply_chat_template
from phaselens.engine.tokenizer import ByteTokenizer
from phaselens.exporters import catalogue
from phaselens.phase import Role


def test_router_picks_least_loaded_live_worker_of_the_role() -> None:
    r = Router()
    for wid in ("w0", "w1"):
        r.add_worker(wid)
    r.add_worker("p0", Role.PREFILL)
    assert r.select("a", 100) == "w0"
    assert r.select("b", 10) == "w1"
    assert r.select("c", 5) == "w1"  # w1: 2 requests now, w0: 1
    assert r.select("d", 5) == "w0"  # w0: 1 request, w1: 2
    assert r.select("e", 1) == "w1"  # 2 requests each: w1 has fewer tokens (15 against 105)
    r.release("b")
    loads = [(w.worker_id, w.requests, w.tokens) for w in r.loads()]
    assert loads == [("p0", 0, 0), ("w0", 2, 105), ("w1", 2, 6)]
    assert r.select("f", 1, Role.PREFILL) == "p0"
    assert sorted(r.mark_dead("w1")) == ["c", "e"]
    assert r.select("g", 1) == "w0" and r.alive_count(Role.COLOCATED) == 1
    r.mark_dead("w0")
    with pytest.raises(NoWorkerAvailable, match="colocated"):
        r.select("h", 1)


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    tok = ByteTokenizer()
    s = _TextStream(tok, stop=("END",))
    assert s.add(list(b"hello E")) == "hello "
    assert s.add(list(b"N")) == ""  # "EN" may still become "END"
    assert s.add(list(b"x")) == "ENx"
    assert s.add(list(b"EN")) == ""
    assert s.finish("hello ENx") == ""  # the engine cut "END": nothing more to send
    assert s.text == "hello ENx"
    # an incomplete UTF-8 character is held back until complete
    s2 = _TextStream(tok, stop=())
    euro = "€".encode()
    assert s2.add([euro[0]]) == "" and s2.add(list(euro[1:])) == "€"
    assert s2.finish(None) == ""


def test_chat_template_is_the_documented_one() -> None:
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="hello"), ChatMessage(role="developer", content="x")]
    assert apply_chat_template(msgs) == ("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello\n"
                                         "<|system|>\nx\n<|assistant|>\n")


def test_request_log_lines_follow_the_contract(tmp_path) -> None:
    path = tmp_path / "sub" / "req.jsonl"
    log = RequestLog(path)
    log.write(RequestRecord("cmpl-1", 1, 2, 3, 812, 0, 120, "w0", "colocated", "ok", "length", None))
    log.write(RequestRecord("cmpl-2", 4, None, 5, 10, 0, 0, "w1", "colocated", "aborted", "abort", "s1"))
    log.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"type": "request", "request_id": "cmpl-1", "arrival_ns": 1,
                                    "first_token_ns": 2, "finish_ns": 3, "prompt_tokens": 812,
                                    "cached_tokens": 0, "output_tokens": 120, "worker": "w0",
                                    "role": "colocated", "status": "ok", "finish_reason": "length",
                                    "session_id": None}
    with path.open("a") as f:
        f.write('{"type": "request", "request_id": "cut')  # a crash mid-line
    assert [r["status"] for r in read_request_log(path)] == ["ok", "aborted"]
    with pytest.raises(ValueError, match="status"):
        RequestRecord("x", 1, 2, 3, 1, 0, 1, "w0", "colocated", "fine", None)


def test_engine_metrics_agree_with_the_catalogue() -> None:
    m = EngineMetrics("tiny", hostname="h")
    m.observe_first_token("colocated", 0.03)
    m.observe_inter_token("colocated", 0.01)
    m.observe_finished("colocated", "ok", 0.5, 0.02)
    m.count_rejected("colocated", "queue_full")
    m.set_workers_alive("colocated", 2)
    m.update_engine_stats("w0", "colocated", {"num_running": 2, "num_waiting": 1, "kv_usage": 0.5,
                                              "prefix_hit_tokens": 32, "prefix_query_tokens": 128})
    m.update_engine_stats("w0", "colocated", {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0,
                                              "prefix_hit_tokens": 48, "prefix_query_tokens": 160})
    m.observe_step("w0", "colocated", "decode", 0.004, 0, 3)
    m.observe_kv_transfer("decode", 0.002, 4096)  # split mode's series exist after a first transfer
    text = m.render().decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    for spec in catalogue.by_producer("engine"):
        assert set(spec.sample_names) & exposed or spec.name in exposed, spec.name
    w0 = {"hostname": "h", "model_name": "tiny", "role": "colocated", "worker": "w0"}
    assert _value(text, "phaselens_engine_prefix_cache_hit_tokens_total", **w0) == 48
    assert _value(text, "phaselens_engine_prefix_cache_query_tokens_total", **w0) == 160
    assert _value(text, "phaselens_engine_prefix_cache_hit_ratio", **w0) == 0.3
    assert _value(text, "phaselens_engine_tokens_total", kind="decode", phase="decode", **w0) == 3
    assert _value(text, "phaselens_engine_requests_running", **w0) == 0


def _value(text: str, sample: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {sample}{labels}")


@pytest.mark.parametrize("args,needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--model", "/no/such/folder"], "neither a preset"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--workers", "0"], "--workers"),
    (["--preset", "tiny", "--model", "tiny"], "not both"),
])
def test_serve_rejects_bad_flags_naming_the_value(args, needle) -> None:
    result = CliRunner().invoke(serve, args)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,needle", [
    (["--max-model-len", "999999"], "--max-model-len"),
    (["--max-model-len", "2000", "--num-kv-blocks", "4"], "--max-model-len"),
    (["--host", "999.1.1.1"], "--host"),
    (["--request-log", "/proc/no-such-dir/requests.jsonl"], "--request-log"),
])
def test_serve_rejects_bad_values_before_any_worker_starts(args, needle) -> None:
    result = CliRunner().invoke(serve, ["--preset", "tiny", "--no-shim", "--port", "0", *args])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "listening" not in result.output and "Traceback" not in result.output


def test_serve_rejects_a_request_log_under_a_file(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(serve, ["--preset", "tiny", "--no-shim", "--port", "0",
                                        "--request-log", str(tmp_path / "afile" / "req.jsonl")])
    assert result.exit_code == 2 and "--request-log" in result.output and "is a file" in result.output


def test_serve_rejects_a_port_in_use() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(serve, ["--preset", "tiny", "--no-shim", "--port", str(port)])
    assert result.exit_code == 2 and "--port" in result.output and "in use" in result.output, result.output
    assert "listening" not in result.output


def test_no_restart_is_scheduled_for_a_worker_that_dies_during_start_up(caplog) -> None:
    # start() fails when a worker dies before it is ready; "restarting" a worker of a server that is exiting
    # only misled (the log said a restart was coming, then the process exited)
    import threading

    from phaselens.engine.server import APIServer, ServerConfig
    from phaselens.engine.worker_process import WorkerProcess
    from tests.engine.server_harness import fake_workers

    config = ServerConfig(model="tiny", workers=fake_workers(1))
    api = APIServer(config, tokenizer=ByteTokenizer())
    dead = WorkerProcess(config.workers[0], api._on_event, api._on_exit)
    try:
        api._schedule_restart(dead)
        assert "restarting" not in caplog.text
        assert not [t for t in threading.enumerate() if t.name == "restart-w0"]
    finally:
        api.stop()


def test_an_unexpected_error_is_an_openai_shaped_500() -> None:
    from fastapi.testclient import TestClient

    from phaselens.engine.server import APIServer, ServerConfig

    class BrokenTokenizer(ByteTokenizer):
        def encode(self, text: str, add_bos: bool = True) -> list[int]:
            raise RuntimeError("a bug")

    api = APIServer(ServerConfig(model="tiny", workers=[]), tokenizer=BrokenTokenizer())
    r = TestClient(api.app, raise_server_exceptions=False).post(
        "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal server error (RuntimeError); see the server log",
                                 "type": "server_error", "param": None, "code": "internal_error"}
