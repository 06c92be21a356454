"""The phase receiver: 0660 socket, validation, rejects counted by reason, floods bounded."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from phaselens.agent.receiver import PhaseReceiver, fast_step
from phaselens.agent.state import AgentState
from phaselens.agent.timeline import Timeline
from phaselens.phase import Phase
from phaselens.trace import TraceFormatError, dumps, parse_record, record_to_dict
from tests.agent.sim_helpers import step


def now_step(uuid: str = "GPU-sim-0", i: int = 0, phase: Phase = Phase.DECODE) -> bytes:
    t = time.time_ns()
    return dumps(step(uuid, phase, t - 10_000_000, t, i)).encode()


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


@pytest.fixture
def receiver(tmp_path: Path):
    state = AgentState("test")
    rx = PhaseReceiver(tmp_path / "run" / "phaselens.sock", state, Timeline(horizon_s=60),
                       known_gpus={"GPU-sim-0"})
    rx.start()
    yield rx
    rx.stop()
    assert rx._thread is not None and not rx._thread.is_alive()  # stop() wakes the blocking receive
    assert not rx.socket_path.exists()


def test_socket_is_0660_and_accepts_valid_steps(receiver: PhaseReceiver) -> None:
    mode = os.stat(receiver.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for i in range(5):
            s.sendto(now_step(i=i), str(receiver.socket_path))
    wait_for(lambda: receiver.state.snapshot().shim_received == 5)
    assert len(receiver.timeline.steps("GPU-sim-0")) == 5
    snap = receiver.state.snapshot()
    assert snap.busy_seconds[("GPU-sim-0", Phase.DECODE)] == pytest.approx(0.05)


def test_bad_input_is_counted_by_reason(receiver: PhaseReceiver) -> None:
    far_past = json.loads(now_step())
    far_past["t0_ns"], far_past["t1_ns"] = 1_000, 2_000
    future = json.loads(now_step())
    future["t0_ns"] += 3600 * 10**9
    future["t1_ns"] += 3600 * 10**9
    ends_ahead = json.loads(now_step())  # starts now, ends ten minutes on: busy time not yet spent
    ends_ahead["t1_ns"] += 599 * 10**9
    huge_count = json.loads(now_step())  # a count no float holds: must not reach the exposition
    huge_count["prefill_tokens"] = 10**400
    idle = json.loads(now_step())
    idle["phase"] = "idle"
    bad = [
        (b"\x00\xff garbage", "malformed"),
        (b"{not json", "malformed"),
        (b'{"type":"step","gpu_uuid":"GPU-sim-0"}', "malformed"),
        (b"x" * 10_000, "oversize"),
        (now_step(uuid="GPU-unknown"), "unknown_gpu"),
        (json.dumps(far_past).encode(), "time_range"),
        (json.dumps(future).encode(), "time_range"),
        (json.dumps(ends_ahead).encode(), "time_range"),
        (json.dumps(huge_count).encode(), "malformed"),
        (json.dumps(idle).encode(), "malformed"),
        (b'{"type":"sample","gpu_uuid":"GPU-sim-0","source":"gpm","t_ns":1,"values":{}}', "not_a_step"),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for data, _ in bad:
            s.sendto(data, str(receiver.socket_path))
        s.sendto(now_step(), str(receiver.socket_path))
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    wait_for(lambda: sum(receiver.state.snapshot().shim_rejected.values()) == len(bad)
             and receiver.state.snapshot().shim_received == 1)
    assert receiver.state.snapshot().shim_rejected == expected
    assert receiver._thread is not None and receiver._thread.is_alive()


def test_flood_of_100k_records_in_one_second_is_counted_and_memory_bounded(tmp_path: Path) -> None:
    # 100,000 datagrams arriving within one second (the clock advances 10 us per record)
    clock = [time.time_ns()]

    def now() -> int:
        return clock[0]

    def arrive(data: bytes) -> bool:
        clock[0] += 10_000
        return rx.handle(data)

    state = AgentState("test")
    timeline = Timeline(horizon_s=60, max_steps=5_000)
    rx = PhaseReceiver(tmp_path / "s.sock", state, timeline, known_gpus={"GPU-sim-0"}, max_rate_per_s=10_000,
                       clock=now)
    payloads = [now_step(i=i) for i in range(1000)] + [b"garbage"]
    tracemalloc.start()
    try:
        accepted = sum(arrive(payloads[i % 1001]) for i in range(100_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    snap = state.snapshot()
    assert snap.shim_received + sum(snap.shim_rejected.values()) == 100_000
    # one second of the token bucket (10,000/s, burst 10,000) lets through at most ~20,000; the rest is
    # counted
    assert accepted == snap.shim_received <= 20_001
    assert snap.shim_rejected["rate_limited"] >= 79_000 and snap.shim_rejected["malformed"] >= 1
    assert timeline.size()[0] <= 5_000
    assert peak < 40 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_flood_over_the_socket_does_not_crash(receiver: PhaseReceiver) -> None:
    payload = now_step()
    stop = threading.Event()
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and sent < 100_000:
            try:
                s.sendto(payload, str(receiver.socket_path))
                sent += 1
            except BlockingIOError:
                time.sleep(0.0005)  # the receiver's queue is full: the shim drops here; we retry
    stop.set()

    def seen() -> int:
        snap = receiver.state.snapshot()
        return snap.shim_received + sum(snap.shim_rejected.values())

    wait_for(lambda: seen() == sent)
    assert receiver._thread is not None and receiver._thread.is_alive()


def test_refuses_to_replace_a_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("keep me")
    rx = PhaseReceiver(path, AgentState("t"), Timeline())
    with pytest.raises(ValueError, match="not a socket"):
        rx.start()
    assert path.read_text() == "keep me"


def test_timeline_bounded_by_horizon() -> None:
    tl = Timeline(horizon_s=1.0)
    t = 10**18
    for i in range(2000):  # 20 s of 10 ms steps: only the last ~6 s (horizon + margin) stay
        tl.add_step(step("GPU-1", Phase.DECODE, t + i * 10_000_000, t + (i + 1) * 10_000_000, i))
    n = len(tl.steps("GPU-1"))
    assert 550 <= n <= 610


def test_a_future_record_does_not_push_the_horizon_out() -> None:
    now = time.time_ns()
    tl = Timeline(horizon_s=60.0, clock=lambda: now)
    for i in range(100):
        tl.add_step(step("GPU-1", Phase.DECODE, now - (i + 1) * 100_000_000, now - i * 100_000_000, i))
    tl.add_step(step("GPU-1", Phase.DECODE, now + 9 * 10**9, now + 9 * 10**9 + 1, 999))  # within max_future_s
    assert len(tl.steps("GPU-1")) == 101


def test_deep_nesting_or_huge_integers_are_malformed_not_fatal(receiver: PhaseReceiver) -> None:
    huge = json.loads(now_step())
    huge_text = json.dumps(huge).replace(f'"flops": {huge["flops"]}', '"flops": 1' + "0" * 400)
    assert '"flops": 1000' in huge_text
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"[" * 3000, str(receiver.socket_path))  # json: RecursionError
        s.sendto(huge_text.encode(), str(receiver.socket_path))  # float(int): OverflowError
        s.sendto(now_step(), str(receiver.socket_path))
    wait_for(lambda: receiver.state.snapshot().shim_received == 1)
    assert receiver.state.snapshot().shim_rejected == {"malformed": 2}
    assert receiver._thread is not None and receiver._thread.is_alive()


def _mutations(base: dict) -> list:
    """The base record, and copies with one field wrong in each way the schema can be wrong (or right in a way
    the fast path leaves to the full parser)."""
    out: list = [base, dict(base, extra_key=1), dict(base, flops=5), dict(base, role="COLOCATED"),
                 dict(base, phase="Decode"), dict(base, phase="idle"), dict(base, t1_ns=base["t0_ns"] - 1),
                 dict(base, t1_ns=base["t0_ns"]), dict(base, type="sample"), dict(base, type=1), [base],
                 "step", None]
    values = [True, False, None, -1, 0, 1.5, float("nan"), float("inf"), -0.0, "", "x" * 129, "x" * 128,
              "gpu", "host", "prefill", "colocated", [], {}, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
              10**400]
    for key in base:
        missing = dict(base)
        del missing[key]
        out.append(missing)
        out.extend(dict(base, **{key: v}) for v in values)
    return out


@pytest.mark.parametrize("phase", Phase.busy())
def test_fast_step_accepts_exactly_what_the_parser_accepts_and_builds_the_same_record(phase: Phase) -> None:
    base = record_to_dict(step("GPU-sim-0", phase, 1_000, 2_000, 7, flops=1e12, nbytes=2e9))
    assert fast_step(base) == parse_record(base)  # the shim's records take the fast path
    taken = 0
    for obj in _mutations(base):
        fast = fast_step(obj)
        if fast is None:
            continue  # left to the full parser
        taken += 1
        try:
            full = parse_record(obj)
        except TraceFormatError as exc:
            raise AssertionError(f"fast path accepted what the parser rejects ({exc}): {obj!r}") from None
        assert full == fast and type(full.flops) is type(fast.flops) is float, obj
    assert taken > 10


def test_records_queued_at_stop_are_handled_not_lost(receiver: PhaseReceiver) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for i in range(8):  # within the kernel's default queue of 10
            s.sendto(now_step(i=i), str(receiver.socket_path))
    receiver.stop()  # the thread may be between batches: what is queued is handled before it ends
    assert receiver.state.snapshot().shim_received == 8
    assert [st.step for st in receiver.timeline.steps("GPU-sim-0")] == list(range(8))


def test_flush_hands_over_what_is_queued_at_once(tmp_path: Path) -> None:
    rx = PhaseReceiver(tmp_path / "s.sock", AgentState("t"), Timeline(horizon_s=60), known_gpus={"GPU-sim-0"},
                       batch_delay_s=3600.0)
    rx.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            for i in range(5):
                s.sendto(now_step(i=i), str(rx.socket_path))
        rx.flush()  # whether the thread took some or none yet, all five are on the timeline now
        assert len(rx.timeline.steps("GPU-sim-0")) == 5 and rx.state.snapshot().shim_received == 5
    finally:
        rx.stop()


def test_steps_between_matches_a_full_scan_with_late_arrivals() -> None:
    import random

    rng = random.Random(3)
    tl = Timeline(horizon_s=600.0, clock=lambda: 10**18 + 10**12)  # nothing trimmed here
    t, steps = 10**18, []
    for i in range(3000):
        d = rng.randrange(1, 40) * 10**6
        steps.append(step("GPU-1", Phase.DECODE, t, t + d, i))
        t += d + rng.randrange(0, 5) * 10**6
    order = list(steps)
    for _ in range(200):  # some records arrive late, up to 2 s (another engine on the GPU, a retried send)
        i = rng.randrange(len(order) - 200)
        j = min(len(order) - 1, i + rng.randrange(1, 200))
        order.insert(j, order.pop(i))
    for s in order:
        tl.add_step(s)
    for _ in range(300):
        a = rng.randrange(steps[0].t0_ns, steps[-1].t1_ns)
        b = a + rng.randrange(0, 300) * 10**6
        want = [s for s in order if s.t0_ns <= b and s.t1_ns >= a]
        assert tl.steps_between("GPU-1", a, b) == want


def test_learned_gpus_are_uuids_and_bounded(tmp_path: Path) -> None:
    """Without a list of GPUs the receiver learns them from the records, but only GPU-/MIG- UUIDs and at most
    max_gpus of them: a sender cannot make the agent export a series set per made-up GPU."""
    rx = PhaseReceiver(tmp_path / "s.sock", AgentState("t"), Timeline(horizon_s=60), known_gpus=None,
                       max_gpus=3)
    for data in [now_step(uuid=" "), now_step(uuid="gpu0"), now_step(uuid="GPU-a\nb")]:
        assert not rx.handle(data)
    for i in range(5):
        rx.handle(now_step(uuid=f"GPU-{i}"))
    rx.handle(now_step(uuid="MIG-0"))
    rx.handle(now_step(uuid="GPU-0", i=1))  # a learned GPU keeps being accepted
    snap = rx.state.snapshot()
    assert snap.shim_received == 4 and snap.shim_rejected == {"unknown_gpu": 6}
    assert rx.learned_gpus == {"GPU-0", "GPU-1", "GPU-2"}
    assert rx.timeline.gpu_count() == 3
