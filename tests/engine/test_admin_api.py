"""The admin API (``/admin/mode``): token, loopback gate, validation, rollback; ``phaselens mode`` and
``advisor.apply.apply_recommendation`` against a live server (fake-engine workers: fast, no torch)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from click.testing import CliRunner

from phaselens.advisor.apply import apply_recommendation
from phaselens.engine.mode_cli import mode as mode_cli
from tests.engine.server_harness import LiveServer, fake_workers, handoff_fake_workers, wait_for

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def live():
    with LiveServer(handoff_fake_workers(3), admin_token=TOKEN) as server:
        yield server


def _asgi(app, method: str, path: str, client: tuple[str, int], **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_no_token_configured_means_the_admin_api_is_off() -> None:
    with LiveServer(fake_workers(1)) as server:
        for method in ("GET", "POST"):
            r = httpx.request(method, f"{server.url}/admin/mode", headers=AUTH, json={"mode": "colocated"})
            assert r.status_code == 404
            assert _error(r)["code"] == "admin_off"


def test_missing_wrong_and_remote_callers_are_refused(live) -> None:
    url = f"{live.url}/admin/mode"
    r = httpx.get(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _error(r)["code"] == "missing_token"
    split = {"mode": "split", "prefill": 1, "decode": 1}
    wrong = ("Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}")
    for header in wrong:
        r = httpx.post(url, headers={"Authorization": header}, json=split)
        assert r.status_code == 401, header
    assert httpx.get(url, headers=AUTH).json()["mode"] == "colocated"
    # a caller from another host, with the right token, while the admin API is bound to this machine
    r = _asgi(live.api.app, "POST", "/admin/mode", ("203.0.113.9", 40000), headers=AUTH,
              json={"mode": "split", "prefill": 1, "decode": 1})
    assert r.status_code == 403 and _error(r)["code"] == "admin_local_only" and "203.0.113.9" in r.text
    assert _asgi(live.api.app, "GET", "/admin/mode", ("127.0.0.1", 40000), headers=AUTH).status_code == 200
    assert live.api.mode == "colocated" and live.api.mode_changes == []


@pytest.mark.parametrize("body, names", [
    ({"mode": "split", "prefill": 1, "decode": 0}, "decode must be at least 1"),
    ({"mode": "split", "prefill": 2, "decode": 2}, "only 3 live worker"),
    ({"mode": "split", "prefill": 0, "decode": 1}, "prefill must be at least 1"),
    ({"mode": "split", "prefill": 1}, "needs both"),
    ({"mode": "sideways"}, "'sideways'"),
    ({"mode": "colocated", "prefill": 1}, "split' only"),
    ({"mode": "split", "prefill": "1", "decode": 1}, "prefill"),
    ({"mode": "split", "prefill": 1, "decode": 1, "workers": 9}, "workers"),
    ({"mode": "split", "prefill": 1, "decode": 1, "health_timeout_s": 0.0}, "health_timeout_s"),
])
def test_invalid_mode_requests_get_400_naming_the_problem_and_change_nothing(live, body, names) -> None:
    before = httpx.get(f"{live.url}/admin/mode", headers=AUTH).json()
    r = httpx.post(f"{live.url}/admin/mode", headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    assert names in _error(r)["message"]
    assert httpx.get(f"{live.url}/admin/mode", headers=AUTH).json() == before
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_worker_failing_its_health_check_rolls_the_change_back() -> None:
    workers = handoff_fake_workers(2, fail_role_w1="decode", hang_s_w0=0.0)
    with LiveServer(workers, admin_token=TOKEN, mode_health_timeout_s=5.0) as server:
        r = httpx.post(f"{server.url}/admin/mode", headers=AUTH,
                       json={"mode": "split", "prefill": 1, "decode": 1})
        assert r.status_code == 503
        err = _error(r)
        assert err["code"] == "mode_change_rolled_back" and "w1" in err["message"]
        state = httpx.get(f"{server.url}/admin/mode", headers=AUTH).json()
        assert state["mode"] == "colocated" and {w["role"] for w in state["workers"]} == {"colocated"}
        assert state["changes"][-1]["rolled_back"] is True
        r = httpx.post(f"{server.url}/v1/completions",
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"


def test_a_worker_too_slow_for_its_health_check_rolls_the_change_back() -> None:
    workers = handoff_fake_workers(2, hang_s_w1=3.0)
    with LiveServer(workers, admin_token=TOKEN) as server:
        answers: list[httpx.Response] = []
        first = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{server.url}/admin/mode", headers=AUTH, timeout=30,
            json={"mode": "split", "prefill": 1, "decode": 1, "health_timeout_s": 1.0})))
        first.start()
        wait_for(server.api._mode_lock.locked, 10, "the first change to start")
        # a second change while the first runs is refused, not queued
        r = httpx.post(f"{server.url}/admin/mode", headers=AUTH, json={"mode": "colocated"})
        assert r.status_code == 409 and _error(r)["code"] == "mode_change_in_progress"
        first.join(30)
        r = answers[0]
        assert r.status_code == 503 and "w1 did not answer its health check" in _error(r)["message"]
        assert httpx.get(f"{server.url}/admin/mode", headers=AUTH).json()["mode"] == "colocated"


def test_mode_cli_and_apply_recommendation(live, tmp_path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    runner = CliRunner()
    base = ["--engine", live.url, "--token-file", str(token_file)]
    res = runner.invoke(mode_cli, ["get", *base])
    assert res.exit_code == 0 and "mode: colocated" in res.output, res.output
    res = runner.invoke(mode_cli, ["set", "split", "--prefill", "1", "--decode", "2", *base])
    assert res.exit_code == 0, res.output
    assert "mode: split  (prefill 1, decode 2" in res.output
    res = runner.invoke(mode_cli, ["set", "split", "--prefill", "2", "--decode", "2", *base])
    assert res.exit_code == 1 and "HTTP 400" in res.output and "only 3 live" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(mode_cli, ["set", "split", "--prefill", "1", *base])
    assert res.exit_code == 2 and "--decode" in res.output
    monkeypatch.delenv("PHASELENS_ADMIN_TOKEN", raising=False)
    res = runner.invoke(mode_cli, ["get", "--engine", live.url])
    assert res.exit_code == 2 and "PHASELENS_ADMIN_TOKEN" in res.output
    monkeypatch.setenv("PHASELENS_ADMIN_TOKEN", "wrong")
    res = runner.invoke(mode_cli, ["get", "--engine", live.url])
    assert res.exit_code == 1 and "HTTP 401" in res.output

    done = apply_recommendation(live.url, TOKEN, "colocated")
    assert done.ok and done.changed and done.before["mode"] == "split" and done.after["mode"] == "colocated"
    again = apply_recommendation(live.url, TOKEN, "colocated")
    assert again.ok and not again.changed and "already" in again.message
    split = apply_recommendation(live.url, TOKEN, "split", prefill=2, decode=1)
    assert split.ok and split.changed and (split.after["prefill"], split.after["decode"]) == (2, 1)
    refused = apply_recommendation(live.url, TOKEN, "split", prefill=3, decode=1)
    assert not refused.ok and not refused.changed and refused.error_code == "invalid_mode"
    wrong = apply_recommendation(live.url, "nope", "colocated")
    assert not wrong.ok and "401" in wrong.message
    with pytest.raises(ValueError, match="decode"):
        apply_recommendation(live.url, TOKEN, "split", prefill=1, decode=0)
    assert apply_recommendation(live.url, TOKEN, "colocated").ok
