"""On CUDA: shim intervals come from CUDA events (clock ``gpu``), lie within the host interval of the run,
and collecting them adds no synchronize to the engine's steps (issue 2, GPU acceptance point)."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.sampling_params import SamplingParams
from phaselens.phase import Clock, Phase
from phaselens.serving_shim.device import gpu_uuid_for
from phaselens.serving_shim.shim import PhaseShim

from .conftest import Listener

pytestmark = pytest.mark.gpu

#: The wall-clock mapping is exact to the anchor's launch latency (timer.py): microseconds.
ANCHOR_TOLERANCE_NS = 200_000


@pytest.fixture
def sync_counter(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts calls of every explicit CUDA synchronize once installed (``counter["armed"] = 1``)."""
    counts: Counter = Counter()

    def wrap(owner: object, name: str) -> None:
        orig = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            if counts["armed"]:
                counts[name if owner is torch.cuda else f"{owner.__name__}.{name}"] += 1  # type: ignore
            return orig(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    wrap(torch.cuda, "synchronize")
    wrap(torch.cuda.Event, "synchronize")
    wrap(torch.cuda.Stream, "synchronize")
    return counts


def test_engine_steps_emit_gpu_intervals_without_synchronize(
        listener: Listener, sync_counter: Counter, tmp_path: Path) -> None:
    engine = LLMEngine(EngineConfig(model="tiny", device="cuda:0", max_num_batched_tokens=64, max_num_seqs=8,
                                    num_kv_blocks=256, shim_socket_path=str(listener.path),
                                    shim_jsonl_path=str(tmp_path / "gpu.jsonl")))
    rng = random.Random(11)
    for i in range(10):
        prompt = [rng.randrange(256) for _ in range(rng.randint(5, 150))]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(2, 20), ignore_eos=True))
    torch.cuda.synchronize()  # nothing of the set-up runs inside the measured host interval
    sync_counter["armed"] = 1
    t_start = time.time_ns()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()  # its .tolist() waits for the sampled ids: the engine's own sync, not the shim's
        steps += 1
    t_end = time.time_ns()
    sync_counter["armed"] = 0
    explicit = {k: v for k, v in sync_counter.items() if k != "armed"}
    assert explicit == {}, f"synchronize called during {steps} steps: {explicit}"
    engine.close()  # shutdown may wait for the last events; it is outside the measured steps

    recs = listener.wait_for(steps)
    assert len(recs) == steps and engine.shim.stats.dropped == 0
    assert {r.clock for r in recs} == {Clock.GPU}
    assert {r.phase for r in recs} >= {Phase.PREFILL, Phase.DECODE}
    assert [r.step for r in recs] == list(range(steps))
    for r in recs:
        assert t_start - ANCHOR_TOLERANCE_NS <= r.t0_ns <= r.t1_ns <= t_end + ANCHOR_TOLERANCE_NS
    for a, b in zip(recs, recs[1:]):
        assert a.t1_ns <= b.t0_ns
    assert recs[0].gpu_uuid == gpu_uuid_for("cuda:0") and recs[0].gpu_uuid.startswith("GPU-")


def test_gpu_uuid_is_nvmls() -> None:
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        uuids = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            raw = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            uuids.add(raw.decode() if isinstance(raw, bytes) else raw)
    finally:
        pynvml.nvmlShutdown()
    assert gpu_uuid_for("cuda:0") in uuids


def test_gpu_interval_matches_the_work(listener: Listener) -> None:
    # Steps of one GPU spin kernel (torch.cuda._sleep) separated by host gaps: each record's length is the
    # kernel's as an independent pair of events inside the step measures it, not the host's, and the host
    # gaps show between records. (A first version calibrated the spin against events once; that run included
    # the kernel's lazy module load and under-counted the cycles 20-fold. Measuring beside it avoids that.)
    shim = PhaseShim(_tiny(), device="cuda:0", dtype_bytes=2, socket_path=listener.path)
    torch.cuda._sleep(1000)  # load the kernel's module outside the measured steps
    torch.cuda.synchronize()
    inner = []
    for _ in range(5):
        shim.step_begin()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(4_000_000)  # about 2 ms at H100 clocks
        b.record()
        shim.step_end(Phase.DECODE, decode_ctx=[10])
        inner.append((a, b))
        time.sleep(0.005)  # a host gap after the step: GPU idle, and poll() may re-anchor
        shim.poll()
    shim.close()
    recs = listener.wait_for(5)
    assert len(recs) == 5
    kernel_ms = [a.elapsed_time(b) for a, b in inner]
    durations_ms = [(r.t1_ns - r.t0_ns) / 1e6 for r in recs]
    assert all(k > 0.5 for k in kernel_ms), kernel_ms
    for d, k in zip(durations_ms, kernel_ms):
        assert k <= d + 0.001 and d - k < 0.2, (durations_ms, kernel_ms)  # two event records of slack
    gaps_ms = [(b.t0_ns - a.t1_ns) / 1e6 for a, b in zip(recs, recs[1:])]
    # the host sleeps 5 ms after launching each step, the GPU finishes the step some time after the launch:
    # the GPU gap is 5 ms minus that lag (3.3 ms seen on the H100), never an overlap
    assert all(g >= 1.0 for g in gaps_ms), gaps_ms


def _tiny():
    from phaselens.engine.config import preset

    return preset("tiny")
