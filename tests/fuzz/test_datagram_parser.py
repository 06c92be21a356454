"""Fuzz the datagram path: ``phaselens.trace.parse_line`` and the receiver's ``handle``. No input crashes
either; the parser answers a record, None (unknown type) or TraceFormatError; the receiver accepts or
rejects every datagram and counts each rejection under a known reason."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from phaselens.agent.receiver import REASONS, PhaseReceiver
from phaselens.agent.state import AgentState
from phaselens.agent.timeline import Timeline
from phaselens.trace import MetaRecord, SampleRecord, StepRecord, TraceFormatError, dumps, parse_line
from tests.fuzz.strategies import json_values, mutated, sample_dicts, step_dicts

NOW = 1_800_000_000_000_000_000
#: steps inside the receiver's time window, so the accepting path is fuzzed too
_timely = step_dicts().map(lambda d: {**d, "t0_ns": NOW - 10**9, "t1_ns": NOW - 10**9 + 10**6})
_datagrams = (st.binary(max_size=600)
              | _timely.map(lambda d: json.dumps(d).encode())
              | mutated(_timely).map(lambda d: json.dumps(d).encode())
              | json_values.map(lambda v: json.dumps(v).encode())
              | mutated(step_dicts()).map(lambda d: json.dumps(d).encode())
              | step_dicts().map(lambda d: json.dumps(d).encode()))


def _parse(data: bytes) -> object:
    try:
        return parse_line(data)
    except TraceFormatError:
        return TraceFormatError


@given(_datagrams)
def test_parse_line_answers_a_record_none_or_trace_format_error(data: bytes) -> None:
    got = _parse(data)
    assert got is TraceFormatError or got is None or isinstance(got, (MetaRecord, StepRecord, SampleRecord))
    if isinstance(got, StepRecord):
        assert got.t1_ns >= got.t0_ns >= 0 and got.flops >= 0 and got.bytes >= 0


@given(st.one_of(step_dicts(), sample_dicts()))
def test_valid_records_round_trip(obj: dict) -> None:
    rec = parse_line(json.dumps(obj))
    assert rec is not None and parse_line(dumps(rec)) == rec


@given(st.lists(_datagrams, min_size=1, max_size=30))
def test_receiver_handle_never_raises_and_counts_every_rejection(datagrams: list[bytes]) -> None:
    state = AgentState("fuzz")
    rx = PhaseReceiver(Path("/nonexistent/never-bound.sock"), state, Timeline(horizon_s=60),
                       known_gpus=None, max_rate_per_s=1e9, clock=lambda: NOW)
    accepted = sum(1 for d in datagrams if rx.handle(d))
    snap = state.snapshot()
    assert set(snap.shim_rejected) <= set(REASONS)
    # every datagram is either received or rejected under a reason: nothing vanishes uncounted
    assert snap.shim_received == accepted
    assert accepted + sum(snap.shim_rejected.values()) == len(datagrams)
