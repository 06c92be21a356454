"""Runs ``phaselens agent`` as a real process (what the DaemonSet runs), so a test can SIGKILL it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.faults.helpers import parse_exposition, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """``phaselens agent --source simulated`` on ``socket_path``, serving on a free loopback port."""

    def __init__(self, socket_path: Path, *extra: str, horizon_s: float = 5.0):
        self.socket_path = socket_path
        self.port = free_port()
        self.horizon_s = horizon_s
        self.args = [sys.executable, "-m", "phaselens", "agent", "--source", "simulated", "--socket-path",
                     str(socket_path), "--listen-address", "127.0.0.1", "--port", str(self.port),
                     "--horizon-s", str(horizon_s), "--attribute-interval-s", "0.5", *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "AgentProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_for(lambda: self._up(), timeout_s, "the agent to serve /health")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict:
        return parse_exposition(httpx.get(self.url + "/metrics", timeout=10).text)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the agent hangs (alive, socket bound, nobody reading: its queue fills)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused agent cannot handle SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
