"""Fuzz the trace reader: any file content reads without a crash; every non-blank line is a record, an
unknown record, or a counted malformed line."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from phaselens.trace import read_trace
from tests.fuzz.strategies import json_values, mutated, sample_dicts, step_dicts

_lines = (st.text(max_size=80).map(lambda t: t.replace("\n", " ").replace("\r", " "))
          | json_values.map(json.dumps)
          | mutated(step_dicts()).map(json.dumps) | step_dicts().map(json.dumps)
          | mutated(sample_dicts()).map(json.dumps) | sample_dicts().map(json.dumps))


@given(st.lists(_lines, max_size=25))
def test_read_trace_counts_every_line(tmp_path_factory, lines: list[str]) -> None:
    path = Path(tmp_path_factory.mktemp("trace")) / "t.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    trace = read_trace(path)
    # the lines as the reader sees them (text-mode iteration: universal newlines only)
    with open(path, encoding="utf-8", errors="replace") as fh:
        nonblank = [ln for ln in fh if ln.strip()]
    meta = 0 if trace.meta is None else 1
    records = len(trace.steps) + len(trace.samples)
    assert records + trace.malformed + trace.unknown + meta <= len(nonblank)
    assert records + trace.malformed + trace.unknown >= len(nonblank) - sum(
        1 for ln in nonblank if '"meta"' in ln)


@given(st.binary(max_size=2000))
def test_read_trace_of_arbitrary_bytes(tmp_path_factory, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("trace")) / "t.jsonl"
    path.write_bytes(data)
    trace = read_trace(path)  # never raises: undecodable bytes are replaced, bad lines counted
    assert trace.malformed >= 0
