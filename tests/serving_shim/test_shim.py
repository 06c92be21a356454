"""PhaseShim with fake steps on CPU: records, phases, counts, intervals, cost, drops, the disabled no-op."""

from __future__ import annotations

from pathlib import Path

import pytest

from phaselens.engine.config import preset
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.cost import step_cost
from phaselens.serving_shim.device import _uuid_from_nvml, gpu_uuid_for
from phaselens.serving_shim.shim import DEFAULT_SOCKET_PATH, PhaseShim, ShimStats
from phaselens.serving_shim.timer import StepTimer
from phaselens.trace import read_trace

from .conftest import Listener

TINY = preset("tiny")

# (phase, prefill_seqs, decode_ctx) of a short fake run: two prompts, one chunked, then decodes.
FAKE_STEPS = [
    (Phase.PREFILL, [(8, 0), (6, 0, False)], []),
    (Phase.MIXED, [(4, 6)], [8]),
    (Phase.DECODE, [], [9, 10]),
    (Phase.DECODE, [], [10, 11]),
]


def _run(shim: PhaseShim) -> None:
    for phase, prefill, decode in FAKE_STEPS:
        shim.step_begin()
        shim.step_end(phase, prefill_seqs=prefill, decode_ctx=decode)
        shim.poll()


def test_default_socket_path_is_the_designs() -> None:
    assert DEFAULT_SOCKET_PATH == "/run/phaselens/phaselens.sock"


def test_every_step_arrives_with_its_phase_counts_and_cost(listener: Listener) -> None:
    shim = PhaseShim(TINY, engine_id="w3", role=Role.PREFILL, socket_path=listener.path)
    _run(shim)
    shim.close()
    recs = listener.wait_for(4)
    assert [r.step for r in recs] == [0, 1, 2, 3]
    assert [r.phase for r in recs] == [p for p, _, _ in FAKE_STEPS]
    for rec, (_, prefill, decode) in zip(recs, FAKE_STEPS):
        assert (rec.gpu_uuid, rec.engine_id, rec.role) == ("GPU-sim-0", "w3", Role.PREFILL)
        assert rec.clock is Clock.HOST
        assert (rec.flops, rec.bytes) == step_cost(TINY, prefill, decode, 4)
    assert [(r.prefill_tokens, r.decode_tokens, r.batch, r.context_tokens) for r in recs] == [
        (14, 0, 2, 14), (4, 1, 2, 10 + 9), (0, 2, 2, 10 + 11), (0, 2, 2, 11 + 12)]
    for a, b in zip(recs, recs[1:]):
        assert a.t0_ns <= a.t1_ns <= b.t0_ns
    assert shim.stats == ShimStats(sent=4, dropped=0, pending=0, written=0)


def test_jsonl_trace_is_readable(listener: Listener, tmp_path: Path) -> None:
    out = tmp_path / "trace.jsonl"
    with PhaseShim(TINY, gpu_uuid="GPU-abc", socket_path=listener.path, jsonl_path=out) as shim:
        _run(shim)
    trace = read_trace(out)
    assert trace.meta is not None and [g.uuid for g in trace.meta.gpus] == ["GPU-abc"]
    assert trace.steps == listener.wait_for(4)
    assert shim.stats.written == 5


def test_no_agent_drops_and_counts(sock_dir: Path) -> None:
    shim = PhaseShim(TINY, socket_path=sock_dir / "nobody.sock")
    _run(shim)
    _run(shim)
    assert shim.stats == ShimStats(sent=0, dropped=8, pending=0, written=0)
    shim.close()
    assert shim.stats.dropped == 8


def test_disabled_shim_is_a_no_op(sock_dir: Path, listener: Listener, tmp_path: Path) -> None:
    shim = PhaseShim(TINY, socket_path=listener.path, jsonl_path=tmp_path / "no.jsonl", enabled=False)
    _run(shim)
    # Not even validated: the baseline costs nothing.
    shim.step_end(Phase.PREFILL, decode_ctx=[1])
    assert shim.poll() == 0
    shim.close()
    assert shim.stats == ShimStats()
    assert listener.records == []
    assert not (tmp_path / "no.jsonl").exists()


def test_phase_that_contradicts_the_step_is_rejected(listener: Listener) -> None:
    shim = PhaseShim(TINY, socket_path=listener.path)
    for phase, prefill, decode in [(Phase.PREFILL, [(3, 0)], [4]), (Phase.DECODE, [(3, 0)], []),
                                   (Phase.MIXED, [], [4]), (Phase.IDLE, [], [4])]:
        shim.step_begin()
        with pytest.raises(ValueError, match="phase"):
            shim.step_end(phase, prefill, decode)
    shim.step_begin()
    with pytest.raises(ValueError, match="empty step"):
        shim.step_end(Phase.DECODE, [], [])
    shim.close()


def test_end_without_begin_is_a_bug() -> None:
    shim = PhaseShim(TINY, socket_path=None)
    with pytest.raises(RuntimeError, match="begin"):
        shim.step_end(Phase.DECODE, decode_ctx=[3])


def test_timer_ring_drops_the_oldest() -> None:
    ticks = iter(range(100, 10_000, 10))
    timer: StepTimer[int] = StepTimer("cpu", capacity=3, clock_ns=lambda: next(ticks))
    for i in range(5):
        timer.begin()
        timer.end(i)
    assert (timer.pending, timer.dropped) == (3, 2)
    done = timer.poll()
    assert [p for p, _, _ in done] == [2, 3, 4]
    assert all(t0 < t1 for _, t0, t1 in done)
    assert timer.pending == 0


def test_gpu_uuid_on_cpu_is_simulated() -> None:
    assert gpu_uuid_for("cpu") == "GPU-sim-0"
    assert gpu_uuid_for("cpu", 3) == "GPU-sim-3"


def test_gpu_uuid_through_nvml_by_pci_bus_id() -> None:
    class Props:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x1B, 0

    class FakeNvml:
        calls: list[str] = []

        def nvmlInit(self) -> None:
            self.calls.append("init")

        def nvmlShutdown(self) -> None:
            self.calls.append("shutdown")

        def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> str:
            self.calls.append(bus)
            return "handle"

        def nvmlDeviceGetUUID(self, handle: str) -> bytes:
            return b"GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001"

    nvml = FakeNvml()
    assert _uuid_from_nvml(Props(), 0, nvml) == "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    assert nvml.calls == ["init", "00000000:1b:00.0", "shutdown"]


def test_gpu_uuid_when_nvml_fails_is_an_error() -> None:
    class Props:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 1, 0

    class BrokenNvml:
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1 not found")

    with pytest.raises(RuntimeError, match="00000000:01:00.0"):
        _uuid_from_nvml(Props(), 0, BrokenNvml())


def test_jsonl_is_flushed_while_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("phaselens.serving_shim.shim.FLUSH_INTERVAL_S", 0.0)
    out = tmp_path / "live.jsonl"
    shim = PhaseShim(TINY, socket_path=None, jsonl_path=out)
    shim.step_begin()
    shim.step_end(Phase.PREFILL, prefill_seqs=[(4, 0)])
    shim.poll()
    assert [r.step for r in read_trace(out).steps] == [0]  # readable before close()
    shim.close()
