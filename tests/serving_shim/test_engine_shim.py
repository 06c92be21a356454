"""End to end on CPU: LLMEngine (tiny) with its phase shim sending to a bound datagram socket (issue 2's
shim acceptance points). Every step arrives, phases are right for prefill-only, decode-only and mixed steps,
intervals are ordered and non-overlapping per worker, FLOPs and bytes match a hand computation, and with no
agent listening the engine still runs while the drop counter grows."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from phaselens.engine.config import preset
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.sampling_params import SamplingParams
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.cost import step_cost
from phaselens.serving_shim.shim import PhaseShim, ShimStats
from phaselens.trace import StepRecord, read_trace

from .conftest import Listener

TINY = preset("tiny")
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(socket_path: Path, **kw: object) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)  # 4096 tokens: plenty here, and cheap to allocate
    return LLMEngine(EngineConfig(model="tiny", device="cpu", shim_socket_path=str(socket_path), **kw))


def _run(engine: LLMEngine) -> int:
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


def test_hand_schedule_prefill_mixed_decode(listener: Listener) -> None:
    # Budget 16 tokens a step, A = 10 prompt tokens + 4 out, B = 30 prompt tokens + 2 out. Decodes go first,
    # then chunks, so by hand:
    #   step 0 PREFILL  A 10 tokens on 0 (samples), B's first 6 on 0 (no sample)
    #   step 1 MIXED    A decodes on 10; B 15 more on 6 (21 < 30: no sample)
    #   step 2 MIXED    A decodes on 11; B's last 9 on 21 (samples)
    #   step 3 DECODE   A on 12 (its 4th token), B on 30 (its 2nd)
    expected = [
        (Phase.PREFILL, [(10, 0, True), (6, 0, False)], []),
        (Phase.MIXED, [(15, 6, False)], [10]),
        (Phase.MIXED, [(9, 21, True)], [11]),
        (Phase.DECODE, [], [12, 30]),
    ]
    engine = _engine(listener.path, max_num_batched_tokens=16, engine_id="w0")
    engine.add_request("A", list(range(10)), SamplingParams(max_tokens=4, **GREEDY))
    engine.add_request("B", list(range(50, 80)), SamplingParams(max_tokens=2, **GREEDY))
    t_start = time.time_ns()
    assert _run(engine) == 4
    t_end = time.time_ns()
    engine.close()
    recs = listener.wait_for(4)
    assert [r.step for r in recs] == [0, 1, 2, 3]
    assert [r.phase for r in recs] == [p for p, _, _ in expected]
    assert [(r.prefill_tokens, r.decode_tokens, r.batch, r.context_tokens) for r in recs] == [
        (16, 0, 2, 10 + 6), (15, 1, 2, 21 + 11), (9, 1, 2, 30 + 12), (0, 2, 2, 13 + 31)]
    for rec, (_, prefill, decode) in zip(recs, expected):
        assert (rec.flops, rec.bytes) == step_cost(TINY, prefill, decode, 4)
        assert rec.clock is Clock.HOST and rec.gpu_uuid == "GPU-sim-0" and rec.engine_id == "w0"
        assert rec.role is Role.COLOCATED
    # Written out for two of the steps (tiny: linear params per layer 46080, see test_cost.py):
    # step 0: T=16, one sampling seq, query-key pairs 10*11/2 + 6*7/2 = 76, attended context 16
    #   flops 2*16*2*46080 + 2*1*64*258 + 4*2*64*76 = 2949120 + 33024 + 38912 = 3021056
    #   bytes 4 * (108992 weights + 16*64 embedding rows + 2*2*32*(16 + 16) KV) = 4 * 114112 = 456448
    # step 3: T=2, two sampling seqs, pairs 13 + 31 = 44 = context
    #   flops 2*2*2*46080 + 2*2*64*258 + 4*2*64*44 = 368640 + 66048 + 22528 = 457216
    #   bytes 4 * (108992 + 2*64 + 2*2*32*(44 + 2)) = 4 * 115008 = 460032
    assert (recs[0].flops, recs[0].bytes) == (3021056, 456448)
    assert (recs[3].flops, recs[3].bytes) == (457216, 460032)
    assert t_start <= recs[0].t0_ns
    for a, b in zip(recs, recs[1:]):
        assert a.t0_ns <= a.t1_ns <= b.t0_ns
    assert recs[-1].t1_ns <= t_end
    assert engine.shim.stats == ShimStats(sent=4, dropped=0, pending=0, written=0)


def _random_workload(engine: LLMEngine, rng: random.Random, n: int) -> None:
    vocab = 256
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 70))]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 8), **GREEDY))


def test_every_step_of_a_random_workload_arrives(listener: Listener, tmp_path: Path) -> None:
    # Two workers (say two GPUs) send to one agent, stepping in turn; each one's records are complete,
    # ordered and non-overlapping, with the phases its scheduler chose. The JSONL copy holds the same.
    rng = random.Random(7)
    seen: dict[str, list[tuple[Phase, list, list]]] = {}
    engines = {}
    for wid in ("w0", "w1"):
        eng = _engine(listener.path, max_num_batched_tokens=48, max_num_seqs=6, engine_id=wid,
                      gpu_uuid=f"GPU-sim-{wid[1]}", shim_jsonl_path=str(tmp_path / f"{wid}.jsonl"))
        _random_workload(eng, rng, 8)
        schedule = eng.scheduler.schedule
        log = seen.setdefault(wid, [])

        def spy(schedule=schedule, log=log):  # what the scheduler decided, independently of the shim
            out = schedule()
            if out.scheduled:
                prefill = [(s.num_tokens, s.context_len, s.samples) for s in out.scheduled if s.is_prefill]
                decode = [s.context_len for s in out.scheduled if not s.is_prefill]
                kind = (Phase.MIXED if prefill and decode else Phase.PREFILL if prefill else Phase.DECODE)
                log.append((kind, prefill, decode))
            return out

        eng.scheduler.schedule = spy
        engines[wid] = eng
    t_start = time.time_ns()
    steps = {wid: 0 for wid in engines}
    while any(e.has_unfinished_requests() for e in engines.values()):
        for wid, eng in engines.items():
            if eng.has_unfinished_requests():
                eng.step()
                steps[wid] += 1
    t_end = time.time_ns()
    for eng in engines.values():
        eng.close()
    total = sum(steps.values())
    recs = listener.wait_for(total)
    assert len(recs) == total
    for wid, eng in engines.items():
        mine = [r for r in recs if r.engine_id == wid]
        assert len(mine) == steps[wid] == sum(eng.stats().steps_by_phase.values())
        assert [r.step for r in mine] == list(range(steps[wid]))
        assert {r.gpu_uuid for r in mine} == {f"GPU-sim-{wid[1]}"}
        assert [r.phase for r in mine] == [k for k, _, _ in seen[wid]]
        assert {r.phase for r in mine} == {Phase.PREFILL, Phase.MIXED, Phase.DECODE}
        for r, (_, prefill, decode) in zip(mine, seen[wid]):
            assert (r.flops, r.bytes) == step_cost(TINY, prefill, decode, 4)
            assert r.prefill_tokens == sum(n for n, _, _ in prefill) and r.decode_tokens == len(decode)
        assert t_start <= mine[0].t0_ns and mine[-1].t1_ns <= t_end
        for a, b in zip(mine, mine[1:]):
            assert a.t0_ns <= a.t1_ns <= b.t0_ns
        assert eng.shim.stats == ShimStats(sent=steps[wid], dropped=0, pending=0, written=steps[wid] + 1)
        trace = read_trace(tmp_path / f"{wid}.jsonl")
        assert sorted(trace.steps, key=lambda r: r.step) == mine


def test_no_agent_listening_the_engine_still_runs(sock_dir: Path) -> None:
    quiet = _engine(sock_dir / "nobody.sock", max_num_batched_tokens=32)
    _random_workload(quiet, random.Random(3), 5)
    steps = _run(quiet)
    stats = quiet.shim.stats
    assert steps > 0 and stats == ShimStats(sent=0, dropped=steps, pending=0, written=0)
    quiet.close()
    # Same outputs as an engine without the shim: dropping records changes nothing else.
    outs = {}
    for enabled in (True, False):
        eng = _engine(sock_dir / "nobody.sock", max_num_batched_tokens=32, shim_enabled=enabled)
        _random_workload(eng, random.Random(3), 5)
        res = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = o.output_token_ids
        outs[enabled] = res
        eng.close()
    assert outs[True] == outs[False]


def test_agent_starting_mid_run_gets_the_later_steps(sock_dir: Path) -> None:
    path = sock_dir / "late.sock"
    engine = _engine(path, max_num_batched_tokens=16)
    # The engine's shim, but trying the socket at every step (default: once a second after a miss).
    engine.shim = PhaseShim(engine.model_config, device="cpu", socket_path=path, reconnect_interval_s=0.0)
    engine.add_request("A", list(range(20)), SamplingParams(max_tokens=6, **GREEDY))
    engine.step()
    engine.step()
    late = Listener(path)
    try:
        more = _run(engine)
        engine.close()
        recs = late.wait_for(more)
        assert [r.step for r in recs] == list(range(2, 2 + more))
        assert engine.shim.stats.dropped == 2
    finally:
        late.close()


def test_disabled_shim_sends_nothing(listener: Listener) -> None:
    engine = _engine(listener.path, shim_enabled=False)
    engine.add_request("A", list(range(20)), SamplingParams(max_tokens=3, **GREEDY))
    assert _run(engine) > 0
    engine.close()
    assert engine.shim.stats == ShimStats()
    assert listener.records == []


@pytest.mark.parametrize("bad", [[(0, 0)], [(3, -1)]])
def test_bad_prefill_chunks_are_rejected_naming_the_value(listener: Listener, bad: list) -> None:
    engine = _engine(listener.path)
    engine.shim.step_begin()
    with pytest.raises(ValueError, match="prefill chunk"):
        engine.shim.step_end(Phase.PREFILL, prefill_seqs=bad)
    engine.close()


def test_records_parse_as_design_step_records(listener: Listener) -> None:
    engine = _engine(listener.path)
    engine.add_request("A", list(range(5)), SamplingParams(max_tokens=2, **GREEDY))
    n = _run(engine)
    engine.close()
    recs = listener.wait_for(n)
    assert len(recs) == n and all(isinstance(r, StepRecord) for r in recs)
    assert not listener.errors
