"""Fixtures for the shim tests: a bound Unix datagram socket standing in for the agent."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from phaselens.trace import StepRecord, parse_line


class Listener:
    """A bound datagram socket read by a thread, like the agent's receiver.

    Linux queues at most ``net.unix.max_dgram_qlen`` (10) datagrams per socket, so a listener that only
    read after the run would see the shim's backlog and drops, not its records. ``reading=False`` binds
    without reading (a stalled agent).
    """

    def __init__(self, path: Path, reading: bool = True):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.02)
        self._records: list[StepRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []
        if reading:
            self.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read, name="test-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            rec = parse_line(data)
            if not isinstance(rec, StepRecord):
                self.errors.append(repr(data))
                continue
            with self._lock:
                self._records.append(rec)

    @property
    def records(self) -> list[StepRecord]:
        with self._lock:
            return list(self._records)

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[StepRecord]:
        """The records once ``n`` have arrived (or the deadline passed: the caller's assert then says so)."""
        deadline = time.monotonic() + timeout_s
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.records

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="pls-") as d:
        yield Path(d)


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[Listener]:
    lst = Listener(sock_dir / "agent.sock")
    yield lst
    lst.close()
