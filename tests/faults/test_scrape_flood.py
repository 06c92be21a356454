"""The Prometheus scrape slow or concurrent: 50 parallel scrapes of a running agent, plus clients that stall
mid-request or read slowly, while the engine's shim floods the phase socket. Every scrape answers, the
stalled clients block nobody, and no step is lost or rejected because of the scrapes."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from phaselens.agent.daemon import AgentConfig, build_daemon, make_http_server
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.emitter import PhaseEmitter
from phaselens.trace import StepRecord
from tests.faults.helpers import parse_exposition, value, wait_for

SCRAPES = 50


def test_fifty_parallel_scrapes_and_stalled_clients_during_a_step_flood(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    daemon = build_daemon(AgentConfig(source="simulated", socket_path=str(sock), hostname="node-s",
                                      horizon_s=10, attribute_interval_s=0.2))
    server = make_http_server(daemon.state, "127.0.0.1", 0)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    wait_for(lambda: sock.exists() and daemon.state.snapshot().started, 10, "the agent to start")
    emitter = PhaseEmitter(str(sock))
    stop = threading.Event()
    sent = [0]

    def flood() -> None:  # ~1,000 steps/s: eight engines' worth of 8 ms steps
        n = 0
        while not stop.is_set():
            for _ in range(5):
                t1 = time.time_ns()
                emitter.emit(StepRecord("GPU-sim-0", "e0", Role.COLOCATED, Phase.DECODE, n, t1 - 400_000, t1,
                                        Clock.HOST, 0, 8, 8, 500, 1e9, 1e8))
                n += 1
            sent[0] = n
            time.sleep(0.005)
        while emitter.retry():  # what the shim does at its next steps: the parked records go out
            time.sleep(0.005)

    stalled = []
    try:
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        # slow clients: one sends half a request line and stalls; one asks and never reads its answer
        half = socket.create_connection(("127.0.0.1", server.server_address[1]))
        half.sendall(b"GET /met")
        stalled.append(half)
        mute = socket.create_connection(("127.0.0.1", server.server_address[1]))
        mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        mute.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(mute)

        def one(_: int) -> tuple[int, str]:
            r = httpx.get(base + "/metrics", timeout=30)
            return r.status_code, r.text

        with ThreadPoolExecutor(SCRAPES) as pool:
            results = list(pool.map(one, range(SCRAPES)))
        assert [code for code, _ in results] == [200] * SCRAPES
        for _, text in results:
            metrics = parse_exposition(text)  # each is a whole, valid exposition
            assert value(metrics, "phaselens_agent_started") == 1
            assert value(metrics, "phaselens_agent_collect_errors_total") == 0
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        stop.set()
        flooder.join(5)
        # every step the shim sent arrived and was accepted: the scrapes cost the engine nothing
        total = sent[0]
        wait_for(lambda: daemon.state.snapshot().shim_received >= total, 10, f"{total} steps received")
        snap = daemon.state.snapshot()
        assert emitter.dropped == 0 and snap.shim_received == total and total > 500
        assert snap.shim_rejected == {}
        final = parse_exposition(httpx.get(base + "/metrics", timeout=10).text)
        assert value(final, "phaselens_shim_events_received_total") == total
        assert value(final, "phaselens_phase_time_ratio", gpu_uuid="GPU-sim-0", phase="decode") > 0
    finally:
        stop.set()
        for s in stalled:
            s.close()
        emitter.close()
        daemon.stop()
        loop.join(5)
        server.shutdown()
        server.server_close()
