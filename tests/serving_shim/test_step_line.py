"""StepLine: the shim's hand-formatted step line is byte for byte what ``phaselens.trace.dumps`` writes, and
the shim's records (socket and JSONL) are unchanged by it."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from phaselens.engine.config import preset
from phaselens.phase import Clock, Phase, Role
from phaselens.serving_shim.cost import StepShape, step_figures, step_shape
from phaselens.serving_shim.emitter import PhaseEmitter
from phaselens.serving_shim.shim import PhaseShim
from phaselens.serving_shim.step_line import StepLine, step_head
from phaselens.trace import StepRecord, dumps, read_trace

from .conftest import Listener

TINY = preset("tiny")
counts = st.integers(min_value=0, max_value=2**63)
amounts = st.one_of(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
                    st.integers(min_value=0, max_value=10**30).map(float))
ids = st.text(min_size=1, max_size=40)  # quotes, backslashes, control and non-ASCII characters included


def _line(uuid: str, engine: str, role: Role, phase: Phase, step: int, t0: int, t1: int, clock: Clock,
          figures: tuple) -> StepLine:
    return StepLine(step_head(uuid, engine, role), uuid, engine, role, phase, step, t0, t1, clock, figures)


@settings(max_examples=300, deadline=None)
@given(uuid=ids, engine=ids, role=st.sampled_from(Role), phase=st.sampled_from(Phase), step=counts, t0=counts,
       dt=counts, clock=st.sampled_from(Clock), ints=st.tuples(counts, counts, counts, counts, counts),
       flops=amounts, nbytes=amounts)
def test_line_is_what_dumps_writes(uuid: str, engine: str, role: Role, phase: Phase, step: int, t0: int,
                                   dt: int, clock: Clock, ints: tuple, flops: float, nbytes: float) -> None:
    line = _line(uuid, engine, role, phase, step, t0, t0 + dt, clock, (*ints, flops, nbytes))
    rec = StepRecord(gpu_uuid=uuid, engine_id=engine, role=role, phase=phase, step=step, t0_ns=t0,
                     t1_ns=t0 + dt, clock=clock, prefill_tokens=ints[0], decode_tokens=ints[1], batch=ints[2],
                     context_tokens=ints[3], flops=flops, bytes=nbytes)
    assert line.record() == rec
    assert line.json() == dumps(rec)


def test_non_finite_figures_fall_back_to_dumps() -> None:
    for flops in (float("inf"), float("nan")):
        line = _line("GPU-0", "e0", Role.DECODE, Phase.DECODE, 1, 2, 3, Clock.GPU,
                     (0, 1, 1, 5, 1, flops, 1.0))
        assert line.json() == dumps(line.record())
        assert "Infinity" in line.json() or "NaN" in line.json()


def test_figures_are_the_step_shape() -> None:
    args = (TINY, [(10, 0, True), (6, 0, False)], [3, 40], 4)
    assert step_shape(*args) == StepShape(*step_figures(*args))


def test_shim_records_after_a_role_change_and_in_the_jsonl(listener: Listener, tmp_path: Path) -> None:
    jsonl = tmp_path / "steps.jsonl"
    shim = PhaseShim(TINY, gpu_uuid='GPU-"q"\\é', engine_id="w\n1", socket_path=listener.path,
                     jsonl_path=jsonl)
    shim.step_begin()
    shim.step_end(Phase.PREFILL, prefill_seqs=[(10, 0), (6, 0, False)])
    shim.role = Role.DECODE
    shim.step_begin()
    shim.step_end(Phase.DECODE, decode_ctx=[12, 30])
    shim.close()
    got = listener.wait_for(2)
    assert [(r.role, r.phase) for r in got] == [(Role.COLOCATED, Phase.PREFILL), (Role.DECODE, Phase.DECODE)]
    assert all((r.gpu_uuid, r.engine_id) == ('GPU-"q"\\é', "w\n1") for r in got)
    for rec, (prefill, decode) in zip(got, [([(10, 0), (6, 0, False)], []), ([], [12, 30])]):
        shape = step_shape(TINY, prefill, decode, 4)
        assert (rec.prefill_tokens, rec.decode_tokens, rec.batch, rec.context_tokens) == (
            shape.prefill_tokens, shape.decode_tokens, shape.batch, shape.context_tokens)
        assert (rec.flops, rec.bytes) == (shape.flops, shape.bytes)
    assert read_trace(jsonl).steps == got
    lines = [ln for ln in jsonl.read_text().splitlines() if '"type":"step"' in ln]
    assert lines == [dumps(r) for r in got]


def test_emit_lazy_formats_nothing_while_the_agent_is_absent(tmp_path: Path) -> None:
    calls = []
    line = _line("GPU-0", "e0", Role.COLOCATED, Phase.DECODE, 1, 2, 3, Clock.HOST, (0, 1, 1, 5, 1, 1.0, 2.0))

    class Probe:
        def json(self) -> str:
            calls.append("json")
            return line.json()

        def record(self) -> StepRecord:
            calls.append("record")
            return line.record()

    em = PhaseEmitter(tmp_path / "nobody.sock", reconnect_interval_s=60.0)
    assert not em.emit_lazy(Probe())  # finds no agent: formatted once, dropped
    assert not em.emit_lazy(Probe())  # known absent: dropped unformatted
    assert calls == ["json"] and em.dropped == 2
    em.close()
