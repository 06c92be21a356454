"""The claims of docs/security.md, each enforced here (the section names match the document's)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from phaselens.agent.daemon import make_http_server
from phaselens.agent.receiver import PhaseReceiver
from phaselens.agent.state import AgentState
from phaselens.agent.timeline import Timeline
from phaselens.engine.server import APIServer, ServerConfig
from phaselens.trace import StepRecord
from tests.engine.server_harness import LiveServer, fake_workers

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "pl-admin-9c1b7e0d5a3f"
SECRET_PROMPT = "PL-SECRET-PROMPT-41d9"

# ---------------------------------------------------------------- 1. the shim socket


def _receiver(path: Path, state: AgentState | None = None) -> PhaseReceiver:
    return PhaseReceiver(path, state or AgentState("sec"), Timeline(horizon_s=60), known_gpus={"GPU-0"})


def test_socket_is_created_0660_in_a_created_folder(tmp_path: Path) -> None:
    path = tmp_path / "run" / "phaselens" / "phaselens.sock"
    rx = _receiver(path)
    rx.start()
    try:
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660  # owner and group send; others nothing
    finally:
        rx.stop()
    assert not path.exists()  # its own socket is removed at stop


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_socket_path_never_replaces_a_file_or_follows_a_symlink(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "phaselens.sock"
    if kind == "file":
        path.write_text("keep me")
    else:
        path.symlink_to(target)
    rx = _receiver(path)
    with pytest.raises(ValueError, match="not a socket; refusing to replace it"):
        rx.start()
    rx.stop()
    assert target.read_text() == "keep me" and (path.is_symlink() if kind == "symlink" else path.is_file())


def test_datagram_size_and_rate_are_capped_and_counted(tmp_path: Path) -> None:
    state = AgentState("sec")
    now = time.time_ns()
    rx = PhaseReceiver(tmp_path / "s.sock", state, Timeline(horizon_s=60), known_gpus={"GPU-0"},
                       max_rate_per_s=10, clock=lambda: now)
    assert not rx.handle(b"{" + b" " * 5000 + b"}")
    for _ in range(20):
        rx.handle(b"{}")
    rejected = state.snapshot().shim_rejected
    assert rejected["oversize"] == 1 and rejected["rate_limited"] == 10


# ---------------------------------------------------------------- 2. the admin API


@pytest.fixture(scope="module")
def admin_server():
    with LiveServer(fake_workers(1), admin_token=TOKEN) as srv:
        yield srv


def test_admin_api_is_off_without_a_token() -> None:
    with LiveServer(fake_workers(1)) as srv:
        for method in ("GET", "POST"):
            r = httpx.request(method, f"{srv.url}/admin/mode", json={"mode": "colocated"},
                              headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
            assert r.status_code == 404 and r.json()["error"]["code"] == "admin_off"


def test_admin_api_needs_the_exact_bearer_token(admin_server) -> None:
    url = f"{admin_server.url}/admin/mode"
    for headers in ({}, {"authorization": TOKEN}, {"authorization": "Bearer " + TOKEN[:-1]},
                    {"authorization": "Bearer " + TOKEN + "x"}, {"authorization": "Basic " + TOKEN}):
        for method in ("GET", "POST"):
            r = httpx.request(method, url, json={"mode": "colocated"}, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, r.text)
            assert TOKEN[:8] not in r.text  # neither the token nor what was sent is echoed
    ok = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["mode"] == "colocated"


def test_admin_token_is_compared_in_constant_time() -> None:
    src = inspect.getsource(APIServer._check_admin)
    assert "hmac.compare_digest(" in src
    # no ordinary comparison of anything with the token
    assert not re.search(r"(==|!=)\s*token\b|\btoken\s*(==|!=)", src.replace("token is None", ""))


def test_admin_api_answers_loopback_callers_only_by_default(admin_server) -> None:
    from starlette.testclient import TestClient

    # the test client's peer address is "testclient": not loopback, as a remote caller
    remote = TestClient(admin_server.api.app).get("/admin/mode", headers={"authorization": f"Bearer {TOKEN}"})
    assert remote.status_code == 403 and remote.json()["error"]["code"] == "admin_local_only"


def test_engine_binds_to_loopback_and_admin_is_local_and_off_by_default() -> None:
    from phaselens.engine.serve_cli import serve

    import click

    ctx = click.Context(serve)
    params = {p.name: p for p in serve.params}
    assert params["host"].get_default(ctx) == "127.0.0.1"
    assert params["admin_remote"].is_flag and not params["admin_remote"].get_default(ctx)
    fields = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    assert fields["admin_token"] is None and fields["admin_remote"] is False


# ---------------------------------------------------------------- 3. no prompt text or secrets exposed


def test_metrics_health_and_logs_expose_no_prompt_text_or_token(tmp_path: Path) -> None:
    log_path = tmp_path / "requests.jsonl"
    with LiveServer(fake_workers(1), admin_token=TOKEN, request_log=str(log_path)) as srv:
        ok = httpx.post(f"{srv.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 4, "user": SECRET_PROMPT + "-user"},
            headers={"x-session-id": "s1"})
        assert ok.status_code == 200
        chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4})
        assert chat.status_code == 200
        # bad requests carrying the secret: the error names the field, never echoes the value
        for body in ({"model": "tiny", "prompt": {"x": SECRET_PROMPT}},
                     {"model": "tiny", "prompt": SECRET_PROMPT * 40, "max_tokens": 250},
                     {"model": SECRET_PROMPT, "prompt": "x", "max_tokens": "1"}):
            bad = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
            assert bad.status_code == 400 and SECRET_PROMPT not in bad.text, bad.text
        pages = [httpx.get(f"{srv.url}{p}", timeout=30, headers={"authorization": f"Bearer {TOKEN}"}).text
                 for p in ("/metrics", "/health", "/v1/models", "/admin/mode")]
    pages.append(log_path.read_text())
    for page in pages:
        assert SECRET_PROMPT not in page and TOKEN not in page


def test_step_records_carry_no_text_but_bounded_ids() -> None:
    text_fields = {f.name for f in dataclasses.fields(StepRecord) if f.type in ("str", str)}
    assert text_fields == {"gpu_uuid", "engine_id", "type"}
    from phaselens.trace import TraceFormatError, parse_line

    step = {"type": "step", "gpu_uuid": "G" * 129, "engine_id": "e", "role": "colocated", "phase": "decode",
            "step": 1, "t0_ns": 1, "t1_ns": 2, "clock": "host", "prefill_tokens": 0, "decode_tokens": 1,
            "batch": 1, "context_tokens": 1, "flops": 1.0, "bytes": 1.0}
    with pytest.raises(TraceFormatError, match="1..128"):
        parse_line(json.dumps(step))


# ---------------------------------------------------------------- 4. request size limits


def test_prompt_and_completion_are_bounded_by_the_context(admin_server) -> None:
    r = httpx.post(f"{admin_server.url}/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "x" * 300, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_an_oversized_body_is_refused_before_parsing(admin_server) -> None:
    body = json.dumps({"model": "tiny", "prompt": "x" * (4 << 20), "max_tokens": 1})
    r = httpx.post(f"{admin_server.url}/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap applies to the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(64):
            yield b"x" * (64 << 10)
        yield b'", "max_tokens": 1}'

    r = httpx.post(f"{admin_server.url}/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(f"{admin_server.url}/v1/completions",
                    json={"model": "tiny", "prompt": "hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200  # the server keeps serving


def test_agent_http_is_read_only(tmp_path: Path) -> None:
    import threading

    server = make_http_server(AgentState("sec"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/metrics", data=b"x",
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 501  # GET only: nothing to change through the agent's port
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- 5. the DaemonSet's least privilege


def _base_docs() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "deploy" / "base").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_daemonset_shares_nothing_of_the_host_but_the_socket_folder() -> None:
    (ds,) = [d for d in _base_docs() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    host_paths = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
    assert host_paths == ["/run/phaselens"]
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True
        assert "hostPort" not in str(c.get("ports", []))
        assert c["resources"]["limits"]["memory"]
    (agent,) = pod["containers"]
    assert "add" not in agent["securityContext"]["capabilities"]  # base: no capability at all
    # a failing sampler or recorder makes the pod unready (/health), never restarts it (liveness: /metrics)
    assert agent["livenessProbe"]["httpGet"]["path"] == "/metrics"


def test_the_agent_gets_no_kubernetes_api_rights() -> None:
    docs = _base_docs()
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["automountServiceAccountToken"] is False


def test_engines_reach_the_socket_through_the_agents_group_only() -> None:
    (ds,) = [d for d in _base_docs() if d["kind"] == "DaemonSet"]
    init = ds["spec"]["template"]["spec"]["initContainers"][0]
    assert "chmod 0770 /run/phaselens" in " ".join(init["command"])
    engine = yaml.safe_load((ROOT / "deploy" / "examples" / "engine-deployment.yaml").read_text())
    pod_sc = engine["spec"]["template"]["spec"]["securityContext"]
    assert 65532 in pod_sc["supplementalGroups"] and pod_sc.get("runAsUser") != 0
