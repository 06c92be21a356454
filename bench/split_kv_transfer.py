"""KV hand-off time in split-pool mode on two GPUs: one prefill worker, one decode worker (issue 6).

Two real engine worker processes (``engine/worker_process.py``), the prefill worker on ``cuda:0`` and the
decode worker on ``cuda:1``, driven over the worker protocol exactly as the API front-end drives them
(the GPU machine has no FastAPI): each request is sent as ``Role.PREFILL``; on ``KVReady`` it is continued
on the decode worker (``ContinueRequest`` with the prefill worker's KV handle: a CUDA IPC mapping of its
cache and a peer copy, ``engine/kv_transfer.py``), which reports the copy's time and bytes
(``KVTransferred``; device synchronized before both clock reads); then the prefill worker frees the blocks.

Measured: per request, the time to copy a ``--prompt-len``-token prompt's KV blocks (none cached on the
decode side: distinct random prompts), after ``--warmup`` untimed hand-offs; and one repeated prompt, whose
full blocks the decode side already holds (only the last block moves). Set next to:

- the link's physical limit: NVLink 4 (Hopper) carries 25 GB/s per direction per link (NVIDIA: 900 GB/s
  bidirectional over 18 links on H100/H200 SXM), times the active links NVML reports; PCIe Gen5 x16
  (64 GB/s per direction) when the GPUs have no active NVLink;
- a plain peer copy of one contiguous buffer of the same size, cuda:0 -> cuda:1, measured here.

Also checks that split mode's greedy tokens equal colocated mode's for one prompt.

    eval "$(bash bench/devpath.sh)"
    python3 bench/split_kv_transfer.py --preset llama-3.1-8b --prompt-len 2048

Needs two GPUs (``nvidia-h200-x2``). Prints a table and appends it to bench/RESULTS.md (``--results``).
"""

from __future__ import annotations

import platform
import queue
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import torch

from phaselens.engine import protocol
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.worker_process import WorkerConfig, WorkerProcess
from phaselens.phase import Role

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: NVLink 4 (Hopper), per link and direction: NVIDIA's H100/H200 SXM datasheets give 900 GB/s
#: bidirectional over 18 links, i.e. 50 GB/s per link both ways, 25 GB/s each way
NVLINK4_BYTES_PER_S_PER_LINK = 25e9
#: PCIe Gen5 x16, per direction (32 GT/s x 16 lanes, 128b/130b: ~63 GB/s; 64 GB/s as usually quoted)
PCIE5_X16_BYTES_PER_S = 64e9


class SplitPair:
    """A prefill worker and a decode worker, and the front-end's side of the hand-off."""

    def __init__(self, preset: str, prompt_len: int, max_tokens: int, utilization: float,
                 devices: tuple[str, str] = ("cuda:0", "cuda:1")):
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        args = dict(model=preset, shim_enabled=False, gpu_memory_utilization=utilization,
                    max_num_batched_tokens=max(512, prompt_len), max_model_len=prompt_len + max_tokens + 16)
        first = dict(args, device=devices[0])
        self.one_gpu = devices[0] == devices[1] and devices[0] != "cpu"
        if devices[0] == "cpu":
            args["num_kv_blocks"] = first["num_kv_blocks"] = 4096
        elif self.one_gpu:
            # both workers on one GPU (a smoke check): the worker sizes its cache from the card's memory in
            # use, so the first takes half the share and the second, started after it, the card's total share
            first["gpu_memory_utilization"] = utilization / 2
        self.prefill = WorkerProcess(WorkerConfig("w0", Role.PREFILL, first), self._on_event, self._on_exit)
        self.decode = WorkerProcess(WorkerConfig("w1", Role.DECODE, dict(args, device=devices[1])),
                                    self._on_event, self._on_exit)
        self.handle: protocol.KVHandle | None = None

    def _on_event(self, worker: WorkerProcess, event: Any) -> None:
        self.events.put((worker.worker_id, event))

    def _on_exit(self, worker: WorkerProcess, code: int | None) -> None:
        self.events.put((worker.worker_id, RuntimeError(f"worker {worker.worker_id} exited ({code}): "
                                                        f"{worker.failure}")))

    def start(self, timeout_s: float = 900.0) -> None:
        self.prefill.start()
        if self.one_gpu:
            self.prefill.wait_ready(timeout_s)
        self.decode.start()
        ready = self.prefill.wait_ready(timeout_s)
        self.decode.wait_ready(timeout_s)
        if ready.kv_handle is None:
            raise RuntimeError("the prefill worker announced no KV handle")
        self.handle = ready.kv_handle

    def stop(self) -> None:
        for w in (self.decode, self.prefill):
            w.stop(30)

    def run(self, rid: str, prompt: list[int], max_tokens: int, split: bool,
            timeout_s: float = 300.0) -> tuple[list[int], protocol.KVTransferred | None]:
        """One request to the end: its output tokens and (split) the decode worker's transfer report."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        role = Role.PREFILL if split else Role.COLOCATED
        self.prefill.send(protocol.AddRequest(rid, prompt, params, time.time_ns(), role))
        tokens: list[int] = []
        moved: protocol.KVTransferred | None = None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                wid, event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"request {rid}: no progress in {timeout_s:.0f} s") from None
            if isinstance(event, Exception):
                raise event
            if isinstance(event, (protocol.RequestRejected, protocol.TransferFailed, protocol.WorkerFailed)):
                raise RuntimeError(f"{wid}: {event}")
            if isinstance(event, protocol.StepReport):
                for d in event.outputs:
                    if d.request_id == rid:
                        tokens += d.new_token_ids
                        if d.finished:
                            return tokens, moved
            elif isinstance(event, protocol.KVReady) and event.handoff.request_id == rid:
                self.decode.send(protocol.ContinueRequest(event.handoff, self.handle))
            elif isinstance(event, protocol.KVTransferred) and event.request_id == rid:
                moved = event
                self.prefill.send(protocol.ReleaseKV(rid))


def _link_limit() -> tuple[float, str]:
    """Bytes/s per direction between GPU 0 and GPU 1, and how it was found."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        links = 0
        for link in range(18):  # NVML_NVLINK_MAX_LINKS on Hopper
            try:
                if pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED:
                    links += 1
            except pynvml.NVMLError:
                break
        pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing or refused: say so, and assume PCIe
        return PCIE5_X16_BYTES_PER_S, f"PCIe Gen5 x16 (NVML: {exc})"
    if links:
        return links * NVLINK4_BYTES_PER_S_PER_LINK, f"NVLink 4, {links} active links x 25 GB/s per direction"
    return PCIE5_X16_BYTES_PER_S, "PCIe Gen5 x16 (no active NVLink)"


def _peer_copy_bw(nbytes: int, iters: int = 10) -> float:
    """Measured bytes/s of one contiguous cuda:0 -> cuda:1 copy of ``nbytes`` (median of ``iters``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    times = []
    for i in range(iters + 2):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize("cuda:1")
        if i >= 2:  # first two are warm-up (peer mapping)
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


@click.command()
@click.option("--preset", default="llama-3.1-8b", show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=16), default=2048, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.1, 0.95), default=0.85, show_default=True)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
@click.option("--smoke", default=None, metavar="DEV0,DEV1",
              help="Only check the protocol on these two devices (cpu,cpu; cuda:0,cuda:0 on one GPU) and "
                   "print greedy equality and blocks moved; no figures kept.")
def main(preset: str, prompt_len: int, requests: int, warmup: int, max_tokens: int,
         gpu_memory_utilization: float, results: Path, smoke: str | None) -> None:
    """Time split mode's KV hand-off per request on two GPUs; append the figures to RESULTS.md."""
    if smoke is not None:
        devices = tuple(d.strip() for d in smoke.split(","))
        if len(devices) != 2 or any(d != "cpu" and not d.startswith("cuda:") for d in devices):
            raise click.BadParameter(f"{smoke!r}: expected two devices, e.g. cpu,cpu or cuda:0,cuda:0",
                                     param_hint="--smoke")
        pair = SplitPair(preset, prompt_len, max_tokens, gpu_memory_utilization, (devices[0], devices[1]))
        pair.start()
        try:
            rng = random.Random(0)
            check = [rng.randrange(32, 127) for _ in range(prompt_len)]
            colocated, _ = pair.run("c", check, max_tokens, split=False)
            split, moved = pair.run("s", check, max_tokens, split=True)
            _, repeat = pair.run("r", check, max_tokens, split=True)
        finally:
            pair.stop()
        click.echo(f"smoke on {smoke}: same tokens {colocated == split}; moved {moved}; repeat {repeat}")
        # The repeat finds every full prompt block in the decode side's prefix cache: only a partial last
        # block moves (none for a prompt of whole blocks, e.g. 2048 tokens at the default 16 per block).
        from phaselens.engine.llm_engine import EngineConfig

        expected = 0 if prompt_len % EngineConfig().block_size == 0 else 1
        if colocated != split or moved is None or repeat is None or repeat.blocks_moved != expected:
            got = getattr(repeat, "blocks_moved", None)
            raise click.ClickException(f"smoke check failed (repeat moved {got} blocks, expected {expected})")
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise click.UsageError(f"needs two CUDA GPUs; {torch.cuda.device_count()} visible")
    gpu = torch.cuda.get_device_name(0)
    p2p = torch.cuda.can_device_access_peer(1, 0)
    rng = random.Random(0)
    pair = SplitPair(preset, prompt_len, max_tokens, gpu_memory_utilization)
    t_start = time.perf_counter()
    pair.start()
    click.echo(f"workers ready in {time.perf_counter() - t_start:.0f} s ({preset}, {gpu} x2, P2P {p2p})")
    try:
        def prompt() -> list[int]:
            return [rng.randrange(32, 127) for _ in range(prompt_len)]

        # greedy check: colocated (all on the prefill GPU) vs split, one prompt
        check = prompt()
        colocated, _ = pair.run("check-colocated", check, max_tokens, split=False)
        split, _ = pair.run("check-split", check, max_tokens, split=True)
        same = colocated == split
        for i in range(warmup):
            pair.run(f"warm-{i}", prompt(), max_tokens, split=True)
        moves: list[protocol.KVTransferred] = []
        for i in range(requests):
            _, moved = pair.run(f"req-{i}", prompt(), max_tokens, split=True)
            assert moved is not None
            moves.append(moved)
        # the same prompt again: the decode side holds its full blocks (prefix cache), only the rest moves
        _, repeat = pair.run("repeat", check, max_tokens, split=True)
    finally:
        pair.stop()
    assert repeat is not None
    secs = sorted(m.seconds for m in moves)
    nbytes = moves[0].bytes
    med = statistics.median(secs)
    p90 = secs[min(len(secs) - 1, int(round(0.9 * (len(secs) - 1))))]
    limit, how = _link_limit()
    copy_bw = _peer_copy_bw(nbytes)
    floor_s = nbytes / limit
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d} — split-mode KV hand-off (issue 6), {gpu} x2",
        "",
        f"Command: `python3 bench/split_kv_transfer.py --preset {preset} --prompt-len {prompt_len} "
        f"--requests {requests}` (machine: {platform.node()}, GPUs: {gpu} x2, P2P access {p2p}; "
        "1 prefill worker on cuda:0, 1 decode worker on cuda:1, CUDA IPC + peer copy)",
        "",
        f"- per request: {prompt_len}-token prompt, {moves[0].blocks_moved} blocks moved, "
        f"{nbytes / 2**20:.1f} MiB, none cached on the decode side",
        f"- transfer time over {len(secs)} requests (after {warmup} warm-up): median {med * 1e3:.3f} ms, "
        f"p90 {p90 * 1e3:.3f} ms, min {secs[0] * 1e3:.3f} ms, max {secs[-1] * 1e3:.3f} ms; "
        f"achieved {nbytes / med / 1e9:.1f} GB/s (median)",
        f"- link's physical limit: {limit / 1e9:.0f} GB/s per direction ({how}): "
        f"floor {floor_s * 1e3:.3f} ms "
        f"for these bytes; the hand-off takes {med / floor_s:.2f}x the floor",
        f"- plain contiguous peer copy of the same bytes, cuda:0 -> cuda:1: {copy_bw / 1e9:.1f} GB/s "
        f"({nbytes / copy_bw * 1e3:.3f} ms); the hand-off (gather, copy, scatter over blocks) takes "
        f"{med / (nbytes / copy_bw):.2f}x that",
        f"- repeated prompt (decode side holds its full blocks): {repeat.blocks_moved} block(s) moved, "
        f"{repeat.blocks_cached} cached, {repeat.bytes / 2**10:.0f} KiB in {repeat.seconds * 1e3:.3f} ms",
        f"- split mode's greedy tokens equal colocated mode's ({max_tokens} tokens): {same}",
        "",
    ]
    text = "\n".join(lines)
    click.echo(text)
    with open(results, "a") as f:
        f.write("\n" + text)
    if not same:
        raise click.ClickException(f"split tokens {split} differ from colocated {colocated}")


if __name__ == "__main__":
    main()
