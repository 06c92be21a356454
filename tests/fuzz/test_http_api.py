"""Fuzz the HTTP API's request models through the real server (FastAPI app, uvicorn, worker processes with
the fake engine): arbitrary JSON, mutated valid bodies and non-JSON bytes. No body gets a 5xx or a
traceback; each bad one is answered 4xx with an OpenAI-shaped error and counted as a rejection
(``phaselens_engine_requests_rejected_total``); a good one is answered 200."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.server_harness import LiveServer, fake_workers
from tests.faults.helpers import parse_exposition
from tests.fuzz.strategies import json_values, mutated

TOKEN = "fuzz-admin-token-0123456789"

_completion = st.fixed_dictionaries({
    "model": st.just("tiny"), "prompt": st.text(max_size=30) | st.lists(st.integers(0, 300), max_size=8),
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "stream": st.booleans()})
_chat = st.fixed_dictionaries({
    "model": st.just("tiny"),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "x"]),
                                                "content": st.text(max_size=20)}), min_size=0, max_size=3),
    "max_tokens": st.integers(1, 8), "stream": st.booleans()})
#: bodies that are not JSON (valid UTF-8: invalid UTF-8 is the strict xfail at the end)
_not_json = st.binary(max_size=100).filter(lambda b: _utf8(b) and not _is_json(b))


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def server():
    with LiveServer(fake_workers(1), admin_token=TOKEN) as srv:
        srv.client = httpx.Client(base_url=srv.url, timeout=30)
        yield srv
        srv.client.close()


def _rejected(srv: Any) -> float:
    text = srv.client.get("/metrics").text
    return sum(v for (n, _), v in parse_exposition(text).items()
               if n == "phaselens_engine_requests_rejected_total")


def _check(resp: httpx.Response, allowed: set[int]) -> None:
    assert resp.status_code in allowed, (resp.status_code, resp.text[:300])
    assert "Traceback" not in resp.text
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@settings(max_examples=150)
@given(body=(json_values | mutated(_completion) | _completion).map(lambda v: json.dumps(v).encode())
       | _not_json)
def test_completions_fuzz(server, body: bytes) -> None:
    before = _rejected(server)
    resp = server.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _check(resp, {200, 400})
    assert _rejected(server) == before + (1 if resp.status_code == 400 else 0)


@settings(max_examples=150)
@given(body=(json_values | mutated(_chat) | _chat).map(lambda v: json.dumps(v).encode()) | _not_json)
def test_chat_fuzz(server, body: bytes) -> None:
    before = _rejected(server)
    resp = server.client.post("/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"})
    _check(resp, {200, 400})
    assert _rejected(server) == before + (1 if resp.status_code == 400 else 0)


@settings(max_examples=100)
@given(body=json_values.map(lambda v: json.dumps(v).encode()) | _not_json,
       # a header value cannot start or end with whitespace on the wire (RFC 9110 5.5: the client refuses to
       # send it, and a server sees it stripped)
       auth=st.none() | st.text(max_size=40).filter(lambda t: t.isprintable() and t.isascii()
                                                    and t == t.strip()))
def test_admin_fuzz_without_the_token_is_always_401(server, body: bytes, auth: str | None) -> None:
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    resp = server.client.post("/admin/mode", content=body, headers=headers)
    _check(resp, {401})


@settings(max_examples=100)
@given(body=json_values.map(lambda v: json.dumps(v).encode()) | _not_json
       | mutated(st.fixed_dictionaries({"mode": st.sampled_from(["colocated", "split"])})).map(
           lambda v: json.dumps(v).encode()))
def test_admin_fuzz_with_the_token(server, body: bytes) -> None:
    resp = server.client.post("/admin/mode", content=body, headers={
        "content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    # 200: a valid change (to the mode it is in); 409 another change runs; 503 rolled back
    _check(resp, {200, 400, 409, 503})


@pytest.mark.parametrize("body", [b"\x80", b'{"model": "tiny", "prompt": "\xe9"}'])
def test_a_body_that_is_not_utf8_is_an_openai_error(server, body: bytes) -> None:
    before = _rejected(server)
    resp = server.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _check(resp, {400})
    assert _rejected(server) == before + 1
