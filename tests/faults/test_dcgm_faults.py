"""dcgm-exporter unreachable, erroring, hanging, or returning garbage, served by a real HTTP server: the agent
goes on, each failed scrape fails that poll (``phaselens_sampler_success 0``), is counted
(``phaselens_sampler_errors_total``) and named in ``/health``; garbage never becomes a sample."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from phaselens.agent.daemon import AgentConfig, build_daemon, health
from tests.faults.helpers import scrape, value

GOOD = """# TYPE DCGM_FI_PROF_SM_ACTIVE gauge
DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-d0",Hostname="node-g"} %s
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-d0",Hostname="node-g"} 87
"""

#: what a broken exporter (or something else on its port) may answer with 200
GARBAGE = {
    "html": "<html><body>502 Bad Gateway</body></html>",
    "binary": "\x00\x01\x02\xff\xfe garbage \x7f",
    "truncated": '# TYPE DCGM_FI_PROF_SM_ACTIVE gauge\nDCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-d0',
    "bad_value": 'DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-d0"} not_a_number\n',
    "nan": 'DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-d0"} NaN\n',
    "out_of_range": 'DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-d0"} 57.5\n',
    "negative": 'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-d0"} -300\n',
    "inf": 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-d0"} +Inf\n',
}


class _Exporter:
    """A stand-in dcgm-exporter whose answer the test changes: ``mode`` is "good", "500", "hang" or a
    GARBAGE key."""

    def __init__(self) -> None:
        self.mode = "good"
        self.value = 0.5
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if exporter.mode == "hang":
                    time.sleep(1.5)  # longer than the sampler's timeout
                code, body = 200, ""
                if exporter.mode == "good":
                    exporter.value = round(exporter.value + 0.01, 4)  # a refresh every scrape
                    body = GOOD % exporter.value
                elif exporter.mode == "500":
                    code, body = 500, "internal error"
                elif exporter.mode in GARBAGE:
                    body = GARBAGE[exporter.mode]
                data = body.encode("utf-8", "surrogateescape")
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sampler gave up (its timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(url: str) -> Any:
    daemon = build_daemon(AgentConfig(source="dcgm", dcgm_url=url, hostname="node-g", horizon_s=10,
                                      attribute_interval_s=0.1), with_receiver=False)
    daemon.state.mark_started()
    daemon.samplers[0].sampler.timeout_s = 0.5
    return daemon


def _poll(daemon: Any) -> list:
    daemon.samplers[0].next_ns = 0
    got: list = []
    inner = daemon.samplers[0].sampler.sample

    def sample() -> list:
        got.extend(inner())
        return got

    daemon.samplers[0].sampler.sample = sample
    try:
        daemon.tick()
    finally:
        daemon.samplers[0].sampler.sample = inner
    return got


def test_unreachable_exporter_is_a_failed_poll_and_the_agent_goes_on() -> None:
    daemon = _daemon(f"http://127.0.0.1:{_free_port()}/metrics")  # nobody listens there
    for _ in range(3):
        assert _poll(daemon) == []
    metrics = scrape(daemon.state)
    assert value(metrics, "phaselens_sampler_success", sampler="dcgm") == 0
    assert value(metrics, "phaselens_sampler_errors_total", sampler="dcgm") == 3
    code, body = health(daemon.state)
    assert code == 503 and "failed" in body["samplers"]["dcgm"]["error"]
    daemon.close()


def test_broken_exporter_every_way_then_recovers(caplog) -> None:
    exporter = _Exporter()
    daemon = _daemon(exporter.url)
    try:
        got = _poll(daemon)
        assert [(s.gpu_uuid, s.values["sm_active"]) for s in got] == [("GPU-d0", exporter.value)]
        expected_errors = 0
        for mode in ["500", "hang", *GARBAGE]:
            exporter.mode = mode
            got = _poll(daemon)
            expected_errors += 1
            # nothing garbled reaches the timeline or the raw gauges: every value is finite and in range
            for rec in got:
                for key, v in rec.values.items():
                    assert v is None or (math.isfinite(v) and v >= 0), (mode, key, v)
                    if key in ("sm_active", "gpu_util") and v is not None:
                        assert v <= 1.0, (mode, key, v)
            snap = daemon.state.snapshot()
            assert not snap.samplers["dcgm"].success, mode
            assert snap.samplers["dcgm"].last_error, mode
            assert snap.sampler_errors["dcgm"] == expected_errors, mode
        exporter.mode = "nan"
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            for _ in range(5):
                _poll(daemon)
        # five garbled polls, all counted, one log line (not one per poll)
        assert daemon.state.snapshot().sampler_errors["dcgm"] == expected_errors + 5
        expected_errors += 5
        assert len([r for r in caplog.records if "garbled" in r.getMessage()]) <= 1
        exporter.mode = "good"
        got = _poll(daemon)
        assert got and got[0].values["sm_active"] == exporter.value
        metrics = scrape(daemon.state)
        assert value(metrics, "phaselens_sampler_success", sampler="dcgm") == 1
        assert value(metrics, "phaselens_sampler_errors_total", sampler="dcgm") == expected_errors
        assert daemon.state.snapshot().raw["GPU-d0"]["gpu_util"] == pytest.approx(0.87)
    finally:
        daemon.close()
        exporter.close()
