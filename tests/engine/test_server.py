"""The API front-end with real tiny-preset engines in real worker processes: bad input, disconnects,
a full queue, and a worker that dies."""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from phaselens.engine.request_log import read_request_log
from tests.engine.server_harness import LiveServer, fake_workers, tiny_workers, wait_for


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "requests.jsonl"
    with LiveServer(tiny_workers(2), request_log=str(log_path)) as srv:
        srv.log_path = log_path
        yield srv


def _assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _ok_completion(url: str) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "ok?", "max_tokens": 3,
                                                  "temperature": 0, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    return r.json()


BAD_BODIES = [
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": 42}, None),
    ({"model": "tiny"}, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 2100, "max_tokens": 1}, "prompt"),
    ({"model": "tiny", "prompt": "x" * 100, "max_tokens": 2000}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
    ({"model": "tiny", "prompt": "x", "temperature": 7.0}, "temperature"),
    # SamplingParams' own checks name their field too
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 2}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": float("inf")}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -1}, "top_k"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "tiny", "prompt": "x", "stop": list("abcdefghijklmnopq")}, "stop"),
    ({"model": "tiny", "prompt": [5, 999999]}, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logprobs": 3}, "logprobs"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_completion_requests_get_400(live, body, param) -> None:
    # json.dumps, not httpx's encoder: NaN and Infinity are sent (as Python's json writes them)
    r = httpx.post(f"{live.url}/v1/completions", content=json.dumps(body).encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    _assert_openai_error(r, 400, param)


def test_malformed_json_and_bad_chat_bodies_get_400_and_the_server_keeps_serving(live) -> None:
    r = httpx.post(f"{live.url}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=30)
    assert _assert_openai_error(r, 400)["code"] == "json_invalid"
    for body in ({"model": "tiny", "messages": "hello"},
                 {"model": "tiny", "messages": []},
                 {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3},
                 {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
                 {"model": "nope", "messages": [{"role": "user", "content": "x"}]}):
        _assert_openai_error(httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=30), 400)
    _ok_completion(live.url)
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and all(w["alive"] for w in health["workers"])


def _post_raw(url: str, path: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON: ``\\ud800`` escapes stay escapes (httpx's own encoder would refuse)."""
    return httpx.post(f"{url}{path}", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json"}, timeout=30)


def test_chat_max_completion_tokens_errors_name_that_field(live) -> None:
    msgs = [{"role": "user", "content": "x"}]
    for n in (0, 5000):
        r = httpx.post(f"{live.url}/v1/chat/completions",
                       json={"model": "tiny", "messages": msgs, "max_completion_tokens": n}, timeout=30)
        _assert_openai_error(r, 400, "max_completion_tokens")
    r = httpx.post(f"{live.url}/v1/chat/completions",
                   json={"model": "tiny", "messages": msgs, "max_tokens": 0}, timeout=30)
    _assert_openai_error(r, 400, "max_tokens")


_PARTS = [{"type": "text", "text": "x"}, {"type": "text", "text": "\udc00"}]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "ok \ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "ok", "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"},
                                           {"role": "user", "content": "a\ud800b"}]}, "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _PARTS}]}, "messages[0].content"),
])
def test_lone_surrogates_get_400_naming_the_field(live, path, body, param) -> None:
    err = _assert_openai_error(_post_raw(live.url, path, {"model": "tiny", **body}), 400, param)
    assert err["type"] == "invalid_request_error" and "surrogate" in err["message"]


def test_huge_top_k_and_seed_are_served_and_no_worker_dies(live) -> None:
    pids = {wid: w.pid for wid, w in live.api.workers.items()}
    for value in (2**63, 2**64, 10**30):
        for path, extra in (("/v1/completions", {"prompt": "k"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "k"}]})):
            body = {"model": "tiny", "max_tokens": 2, "temperature": 1.0, "top_k": value, "seed": value,
                    "ignore_eos": True, **extra}
            r = httpx.post(f"{live.url}{path}", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
    assert {wid: w.pid for wid, w in live.api.workers.items()} == pids
    assert all(w["alive"] for w in httpx.get(f"{live.url}/health").json()["workers"])


def test_model_retrieve(live) -> None:
    r = httpx.get(f"{live.url}/v1/models/tiny")
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    for unknown in ("gpt-4", "org/model"):
        err = _assert_openai_error(httpx.get(f"{live.url}/v1/models/{unknown}"), 404, "model")
        assert err["code"] == "model_not_found" and unknown in err["message"]


def test_streaming_sse_format_usage_and_request_log(live) -> None:
    body = {"model": "tiny", "prompt": "stream me", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30,
                      headers={"X-Session-ID": "sess-1"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    rid = chunks[0]["id"]
    # the same request, not streamed, gives the same (greedy) text
    plain = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=30).json()
    assert plain["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    rec = wait_for(lambda: next((x for x in read_request_log(live.log_path) if x["request_id"] == rid), None))
    assert rec["status"] == "ok" and rec["output_tokens"] == 5 and rec["session_id"] == "sess-1"
    assert rec["prompt_tokens"] == len("stream me") + 1 and rec["worker"] in ("w0", "w1")
    assert rec["arrival_ns"] <= rec["first_token_ns"] <= rec["finish_ns"] and rec["finish_reason"] == "length"


def test_client_disconnect_mid_stream_frees_kv_blocks(live) -> None:
    body = {"model": "tiny", "prompt": "y" * 300, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        rid = json.loads(first[6:])["id"]
        busy = wait_for(lambda: next((w for w in httpx.get(f"{live.url}/health").json()["workers"]
                                      if (w["kv_usage"] or 0) > 0), None), what="the request to hold KV")
    # the client is gone; the worker must abort the request and free its blocks
    wait_for(lambda: all(w["kv_usage"] == 0.0 and w["num_running"] == 0
                         for w in httpx.get(f"{live.url}/health").json()["workers"]),
             timeout_s=30, what="KV blocks freed on every worker")
    rec = wait_for(lambda: next((x for x in read_request_log(live.log_path) if x["request_id"] == rid), None))
    assert rec["status"] == "aborted" and rec["worker"] == busy["id"] and rec["output_tokens"] < 1500
    assert 'phaselens_engine_requests_total{' in httpx.get(f"{live.url}/metrics").text


def test_client_that_gives_up_on_a_plain_request_frees_kv_blocks(live) -> None:
    body = {"model": "tiny", "prompt": "w" * 299, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting after 1 s and closes the connection
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_for(lambda: all(w["kv_usage"] == 0.0 and w["num_running"] == 0
                         for w in httpx.get(f"{live.url}/health").json()["workers"]),
             timeout_s=30, what="KV blocks freed on every worker")
    rec = wait_for(lambda: next((x for x in read_request_log(live.log_path) if x["prompt_tokens"] == 300),
                                None))
    assert rec["status"] == "aborted" and 0 < rec["output_tokens"] < 1500


def test_models_and_metrics(live) -> None:
    models = httpx.get(f"{live.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    _ok_completion(live.url)
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("phaselens_engine_time_to_first_token_seconds_bucket",
                 "phaselens_engine_inter_token_latency_seconds_bucket",
                 "phaselens_engine_request_duration_seconds_count", "phaselens_engine_kv_cache_usage_ratio",
                 "phaselens_engine_requests_running", "phaselens_engine_requests_waiting",
                 "phaselens_engine_step_duration_seconds_bucket", "phaselens_engine_tokens_total",
                 'phaselens_engine_requests_rejected_total{'):
        assert name in text, name


def test_full_queue_answers_503_with_retry_after() -> None:
    # one fake worker whose steps take 2 s: admitted requests wait for their first token that long
    with LiveServer(fake_workers(1, step_s=2.0), max_queue=2) as srv:
        body = {"model": "tiny", "prompt": "q", "max_tokens": 1}
        barrier = threading.Barrier(5)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(post, range(5)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 503, 503, 503], [r.text for r in results]
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert _assert_openai_error(r, 503)["code"] == "queue_full"
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30).status_code == 200


def test_dead_worker_fails_its_requests_and_health_reports_it() -> None:
    # restarts off: this test watches both workers die (tests/faults/test_worker_killed.py covers restarts)
    with LiveServer(tiny_workers(2), restart_workers=False) as srv:
        long = {"model": "tiny", "prompt": "z" * 100, "max_tokens": 1500, "ignore_eos": True}
        pids = {wid: w.pid for wid, w in srv.api.workers.items()}
        url = f"{srv.url}/v1/completions"
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            rid = json.loads(next(ln for ln in lines if ln.startswith("data: "))[6:])["id"]
            victim = srv.api.router.worker_of(rid)
            os.kill(pids[victim], signal.SIGKILL)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest and "[DONE]" not in rest[-1]
        err = json.loads(rest[-1][6:])["error"]
        assert err["code"] == "worker_died" and victim in err["message"]
        health = wait_for(lambda: (h := httpx.get(f"{srv.url}/health")).json()["status"] == "degraded" and h)
        assert health.status_code == 200
        dead = [w for w in health.json()["workers"] if not w["alive"]]
        assert [w["id"] for w in dead] == [victim] and dead[0]["exitcode"] == -signal.SIGKILL
        # the survivor serves; then it dies under a non-streaming request: a 500 with a clear message
        _ok_completion(srv.url)
        survivor = next(w for w in pids if w != victim)
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=long, timeout=60)
            wait_for(lambda: srv.api.router.loads()[int(survivor[1:])].requests == 1, what="request admitted")
            os.kill(pids[survivor], signal.SIGKILL)
            resp = fut.result()
        assert _assert_openai_error(resp, 500)["code"] == "worker_died"
        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 503, what="health 503")
        assert httpx.get(f"{srv.url}/health").json()["status"] == "unavailable"
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
        assert _assert_openai_error(r, 503)["code"] == "no_worker"


def test_serve_reports_a_worker_that_cannot_start_without_a_traceback(monkeypatch) -> None:
    from click.testing import CliRunner

    from phaselens.engine import serve_cli

    # a worker whose engine fails to build (bad flags are usage errors before any worker starts)
    monkeypatch.setattr(serve_cli, "build_worker_configs",
                        lambda *args, **kw: fake_workers(1, fail_start=True))
    result = CliRunner().invoke(serve_cli.serve, ["--preset", "tiny", "--no-shim", "--port", "0"])
    assert result.exit_code == 1, result.output
    assert "worker w0 failed to start" in result.output and "told to fail" in result.output
    assert "Traceback" not in result.output and "listening" not in result.output
