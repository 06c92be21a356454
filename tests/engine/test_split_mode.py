"""Split-pool mode with real tiny-preset workers in separate processes (issue 6).

One server, two CPU workers, admin token set: the same greedy requests answered colocated and split give
the same text; a hand-off copies exactly the prompt blocks the decode worker's prefix cache lacks; and a
continuous load (``phaselens load`` in its own process, plus a checker of answers) survives flips colocated ->
split -> colocated with no failed, lost or different answer.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import httpx
import pytest

from phaselens.engine.loadgen import LengthDist, WorkloadSpec, build_workload
from tests.engine.server_harness import LiveServer, tiny_workers, wait_for

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCK = 16


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    log = tmp_path_factory.mktemp("split") / "requests.jsonl"
    with LiveServer(tiny_workers(2, block_size=BLOCK), admin_token=TOKEN, request_log=str(log)) as server:
        server.request_log_path = log
        yield server


def _finished(live) -> int:
    """Requests the server has finished (its request log's lines)."""
    try:
        return live.request_log_path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(32, 127) for _ in range(n)]


def _complete(url: str, prompt: list[int], max_tokens: int = 10) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _set_mode(url: str, **body) -> dict:
    r = httpx.post(f"{url}/admin/mode", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_split_gives_colocated_answers_and_moves_only_uncached_blocks(live) -> None:
    rng = random.Random(6)
    prompts = [_prompt(rng, n) for n in (5, 16, 17, 40, 70, 130)]
    colocated = [_complete(live.url, p)["choices"][0]["text"] for p in prompts]

    state = _set_mode(live.url, mode="split", prefill=1, decode=1)
    assert (state["mode"], state["prefill"], state["decode"]) == ("split", 1, 1)
    assert {w["role"] for w in state["workers"]} == {"prefill", "decode"}
    split = [_complete(live.url, p) for p in prompts]
    assert [s["choices"][0]["text"] for s in split] == colocated
    moved = {t["request_id"]: t for t in live.api.transfers}
    for p, s in zip(prompts, split):
        assert s["id"] in moved, "every split request is handed over"
        assert s["usage"]["completion_tokens"] == 10

    # exact blocks: a fresh 70-token prompt has 5 blocks, none cached at the decode worker; a second
    # prompt opening with its first 64 tokens (4 full blocks) moves only its last block
    a = _prompt(rng, 70)
    b = a[:64] + _prompt(rng, 10)
    ra, rb = _complete(live.url, a), _complete(live.url, b)
    ta, tb = (next(t for t in live.api.transfers if t["request_id"] == r["id"]) for r in (ra, rb))
    assert (ta["blocks_moved"], ta["blocks_cached"]) == (5, 0)
    assert (tb["blocks_moved"], tb["blocks_cached"]) == (1, 4)
    block_bytes = live.api.kv_handles["w0"].block_bytes
    assert ta["bytes"] == 5 * block_bytes and tb["bytes"] == block_bytes
    assert rb["usage"]["prompt_tokens"] == 74

    metrics = httpx.get(f"{live.url}/metrics").text
    count = next(line for line in metrics.splitlines()
                 if line.startswith("phaselens_engine_kv_transfer_seconds_count") and 'role="decode"' in line)
    assert float(count.rsplit(" ", 1)[1]) == len(live.api.transfers)
    total = next(line for line in metrics.splitlines()
                 if line.startswith("phaselens_engine_kv_transfer_bytes_total"))
    assert float(total.rsplit(" ", 1)[1]) == sum(t["bytes"] for t in live.api.transfers)

    _set_mode(live.url, mode="colocated")
    assert [_complete(live.url, p)["choices"][0]["text"] for p in prompts] == colocated
    # nothing left parked or held: every block free again on both workers
    wait_for(lambda: all(live.api.worker_stats.get(w, {}).get("num_parked", 1) == 0 and
                         live.api.worker_stats[w].get("kv_usage", 1.0) == 0.0 for w in ("w0", "w1")),
             20, "both workers idle with no blocks held")


def test_flip_under_continuous_load_loses_and_fails_nothing(live, tmp_path) -> None:
    _set_mode(live.url, mode="colocated")
    rng = random.Random(7)
    checks = [_prompt(rng, n) for n in (9, 33, 50)]
    expected = [_complete(live.url, p, 12)["choices"][0]["text"] for p in checks]

    spec = WorkloadSpec(num_requests=80, rate=20.0, seed=3, prompt=LengthDist(40, 0.6, 8, 120),
                        output=LengthDist(16, 0.5, 8, 32))
    out = tmp_path / "load.json"
    # `phaselens load`, the real command, in its own process
    load = subprocess.Popen([sys.executable, "-m", "phaselens", "load", "--url", live.url, "-n", "80",
                             "--rate", "20", "--seed", "3", "--prompt-median", "40", "--prompt-sigma", "0.6",
                             "--prompt-min", "8", "--prompt-max", "120", "--output-median", "16",
                             "--output-sigma", "0.5", "--output-min", "8", "--output-max", "32",
                             "--no-progress", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    stop = threading.Event()
    answers: list[tuple[int, int, str]] = []

    def checker() -> None:  # a second client: greedy answers must not change across the flips
        i = 0
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                k = i % len(checks)
                r = client.post(f"{live.url}/v1/completions",
                                json={"model": "tiny", "prompt": checks[k], "max_tokens": 12,
                                      "temperature": 0.0, "ignore_eos": True})
                answers.append((k, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200
                                else r.text))
                i += 1

    check = threading.Thread(target=checker, daemon=True)
    start = _finished(live)
    check.start()
    flips = ["split", "colocated", "split", "colocated"]
    for n, mode in enumerate(flips, start=1):
        # each flip lands while requests are in flight: wait for some progress first
        wait_for(lambda: _finished(live) - start >= 20 * n, 60, f"load progress before flip {n}")
        body = {"mode": mode} if mode == "colocated" else {"mode": mode, "prefill": 1, "decode": 1}
        assert _set_mode(live.url, **body)["mode"] == mode
    printed = load.communicate(timeout=120)[0].decode()
    stop.set()
    check.join(60)
    assert load.returncode == 0, printed

    results = json.loads(out.read_text())["requests"]
    assert len(results) == spec.num_requests, "no request lost"
    failed = [(r["index"], r["status_code"], r["error"]) for r in results if not r["ok"]]
    assert failed == []
    plan = build_workload(spec)
    assert [len(p.prompt) for p in plan] == [r["prompt_tokens"] for r in results], "the same workload"
    short = [(r["index"], r["output_tokens"]) for r, p in zip(results, plan)
             if r["output_tokens"] != p.max_tokens]
    assert short == [], "every response complete"
    assert answers and all(code == 200 for _, code, _ in answers), [a for a in answers if a[1] != 200]
    assert [text for k, _, text in answers] == [expected[k] for k, _, _ in answers]
    changes = [c for c in live.api.mode_changes if c["ok"]][-len(flips):]
    assert [c["to"] for c in changes] == flips
    print("requests in flight at each flip:", [c["in_flight"] for c in changes])
    assert sum(c["in_flight"] > 0 for c in changes) >= 2, "flips landed while requests were in flight"
    assert any(t for t in live.api.transfers), "split phases handed KV over"


def test_client_gone_mid_stream_in_split_mode_frees_blocks_on_both_workers(live) -> None:
    _set_mode(live.url, mode="split", prefill=1, decode=1)
    try:
        body = {"model": "tiny", "prompt": "z" * 300, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as r:
            chunks = (ln for ln in r.iter_lines() if ln.startswith("data: "))
            rid = json.loads(next(chunks)[6:])["id"]
            for _ in range(5):  # tokens from the decode worker: the hand-off happened
                next(chunks)
            assert any(t["request_id"] == rid for t in live.api.transfers)
        # the client is gone: the decode worker aborts it, the prefill worker has released its copy
        wait_for(lambda: all(w["kv_usage"] == 0.0 and w["num_running"] == 0
                             for w in httpx.get(f"{live.url}/health").json()["workers"])
                 and all(live.api.worker_stats[w].get("num_parked") == 0 for w in ("w0", "w1")),
                 30, "KV blocks freed on both workers")
    finally:
        _set_mode(live.url, mode="colocated")
