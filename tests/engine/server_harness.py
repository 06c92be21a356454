"""Runs an :class:`APIServer` with real worker processes and uvicorn on a free port, for the server tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import uvicorn

from phaselens.engine.server import APIServer, ServerConfig
from phaselens.engine.tokenizer import ByteTokenizer
from phaselens.engine.worker_process import WorkerConfig

FAKE = "tests.engine.fake_engine:build"


def tiny_workers(n: int = 2, **engine_args: Any) -> list[WorkerConfig]:
    """``n`` real tiny-preset engines on CPU (one torch thread each: the test machine has 2 cores)."""
    args = dict(model="tiny", device="cpu", shim_enabled=False, num_kv_blocks=256, max_num_seqs=64)
    args.update(engine_args)
    return [WorkerConfig(worker_id=f"w{i}", engine_args=dict(args, gpu_uuid=f"GPU-sim-{i}"), torch_threads=1)
            for i in range(n)]


def fake_workers(n: int = 1, **engine_args: Any) -> list[WorkerConfig]:
    return [WorkerConfig(worker_id=f"w{i}", engine_args=dict(engine_args), engine_factory=FAKE,
                         heartbeat_s=0.1) for i in range(n)]


def wait_for(condition: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_process(cmd: list[str], ready_url: str, what: str, timeout_s: float = 120.0
                    ) -> Iterator[subprocess.Popen[str]]:
    """Start ``cmd`` (a server: `phaselens serve`, prometheus, ...), wait until ``ready_url`` answers 200
    (failing at once, with its output, if it exits), and stop it on exit (SIGTERM, then SIGKILL)."""
    # output to a file, not a pipe: a chatty server would block once a pipe's 64 KiB filled
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)

    def up() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"{what} exited with {proc.returncode}: {log.read()[-4000:]}")
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s=timeout_s, what=f"{what} to answer {ready_url}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


class LiveServer:
    """Context manager: workers started, HTTP served at ``self.url``; everything stopped on exit."""

    def __init__(self, workers: list[WorkerConfig], model: str = "tiny", **config: Any):
        self.api = APIServer(ServerConfig(model=model, workers=workers, worker_start_timeout_s=120, **config),
                             tokenizer=ByteTokenizer())
        self.url = ""
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LiveServer":
        self.api.start()
        cfg = uvicorn.Config(self.api.app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self._uvicorn = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)
        self._thread.start()
        wait_for(lambda: self._uvicorn.started, 30, "uvicorn to start")
        port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            self._thread.join(15)
        self.api.stop()


# -- split mode: a fake engine that can take roles (its KV handle is a stand-in: no block ever moves)

HANDOFF_FAKE = "tests.engine.server_harness:build_handoff_fake"


def handoff_fake_workers(n: int = 2, **engine_args: Any) -> list[WorkerConfig]:
    """Fake-engine workers that announce a KV handle and answer mode changes; ``fail_role`` (a role name,
    in the engine args of one worker) makes that worker refuse it, ``hang_s`` makes it answer that late."""
    return [WorkerConfig(worker_id=f"w{i}", engine_args=dict(engine_args), engine_factory=HANDOFF_FAKE,
                         heartbeat_s=0.1) for i in range(n)]


def build_handoff_fake(config: WorkerConfig) -> Any:
    from phaselens.engine.protocol import KVHandle
    from tests.engine.fake_engine import FakeEngine

    args = dict(config.engine_args)
    fail_role = args.pop(f"fail_role_{config.worker_id}", None)
    hang_s = float(args.pop(f"hang_s_{config.worker_id}", 0.0))
    keys = ("step_s", "max_model_len", "num_kv_blocks", "block_size")

    class HandoffFake(FakeEngine):
        def kv_handle(self) -> KVHandle:
            return KVHandle(worker_id=config.worker_id, kind="shm", shape=(1, 2, self.num_kv_blocks,
                            self.block_size, 1, 1), dtype="torch.float32", device="cpu")

        def set_role(self, role: Any, peers: tuple = ()) -> None:
            if hang_s:
                time.sleep(hang_s)  # a worker too slow to answer its health check
            if fail_role == role.value:
                raise RuntimeError(f"told to refuse the role {fail_role}")

    return HandoffFake(**{k: v for k, v in args.items() if k in keys})
