"""The trace format of DESIGN.md: round trips, forward compatibility, malformed lines."""

from __future__ import annotations

import json
import logging

import pytest

from phaselens.phase import Clock, Phase, Role
from phaselens.trace import (GpuInfo, MetaRecord, SampleRecord, StepRecord, TraceFormatError, TraceWriter,
                             dumps, parse_line, read_trace)

DESIGN_EXAMPLE = [
    '{"type":"meta","version":1,"host":"node-a","gpus":[{"uuid":"GPU-1","index":0,'
    '"name":"NVIDIA H100 80GB HBM3","peak_bf16_flops":9.89e14,"peak_dram_bytes_per_s":3.35e12}]}',
    '{"type":"step","gpu_uuid":"GPU-1","engine_id":"e0","role":"colocated","phase":"prefill","step":17,'
    '"t0_ns":1,"t1_ns":2,"clock":"gpu","prefill_tokens":2048,"decode_tokens":0,"batch":1,'
    '"context_tokens":2048,"flops":3.3e13,"bytes":1.7e10}',
    '{"type":"sample","gpu_uuid":"GPU-1","source":"gpm","t_ns":3,"values":{"sm_active":0.96,'
    '"tensor_active":0.93,"dram_active":0.25}}',
    '{"type":"sample","gpu_uuid":"GPU-1","source":"nvml","t_ns":4,"values":{"gpu_util":0.98,"mem_util":0.35,'
    '"power_w":548.8}}',
]


def test_design_example_round_trips() -> None:
    for line in DESIGN_EXAMPLE:
        rec = parse_line(line)
        assert rec is not None
        assert json.loads(dumps(rec)) == json.loads(line)


def test_step_fields_are_typed() -> None:
    rec = parse_line(DESIGN_EXAMPLE[1])
    assert isinstance(rec, StepRecord)
    assert rec.phase is Phase.PREFILL and rec.role is Role.COLOCATED and rec.clock is Clock.GPU


def test_unknown_types_and_keys_are_ignored() -> None:
    assert parse_line('{"type":"future","x":1}') is None
    rec = parse_line('{"type":"sample","gpu_uuid":"GPU-1","source":"gpm","t_ns":3,"new":1,'
                     '"values":{"sm_active":0.5,"quantum_active":0.1,"dram_active":null}}')
    assert isinstance(rec, SampleRecord)
    assert rec.values == {"sm_active": 0.5, "dram_active": None}


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ("[1,2]", "JSON object"),
    ('{"type":"step"}', "missing field"),
    (DESIGN_EXAMPLE[1].replace('"prefill","step"', '"warmup","step"'), "unknown phase 'warmup'"),
    (DESIGN_EXAMPLE[1].replace('"t0_ns":1', '"t0_ns":5'), "ends before it starts"),
    (DESIGN_EXAMPLE[1].replace('"batch":1', '"batch":-1'), "'batch' is negative"),
    (DESIGN_EXAMPLE[1].replace('"batch":1', '"batch":true'), "'batch' has type bool"),
    (DESIGN_EXAMPLE[2].replace('0.96', '"x"'), "finite number or null"),
    (DESIGN_EXAMPLE[2].replace('"gpm"', '"smoke"'), "unknown source"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    (DESIGN_EXAMPLE[1].replace('"flops":3.3e13', '"flops":' + "9" * 400), "out of range|finite number"),
])
def test_malformed_records_raise_with_reason(line: str, needle: str) -> None:
    with pytest.raises(TraceFormatError, match=needle):
        parse_line(line)


def test_read_trace_counts_and_skips_malformed(tmp_path, caplog) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([DESIGN_EXAMPLE[0], "garbage", DESIGN_EXAMPLE[1], "", DESIGN_EXAMPLE[2],
                               '{"type":"future"}', DESIGN_EXAMPLE[3]]) + "\n")
    with caplog.at_level(logging.WARNING):
        trace = read_trace(path)
    assert trace.malformed == 1 and trace.unknown == 1
    assert len(trace.steps) == 1 and len(trace.samples) == 2
    assert trace.meta is not None and trace.meta.gpus[0].uuid == "GPU-1"
    assert f"{path}:2" in caplog.text


def test_writer_then_reader(tmp_path) -> None:
    path = tmp_path / "sub" / "t.jsonl"
    step = StepRecord(gpu_uuid="GPU-9", engine_id="e", role=Role.DECODE, phase=Phase.DECODE, step=1, t0_ns=10,
                      t1_ns=20, clock=Clock.HOST, prefill_tokens=0, decode_tokens=4, batch=4,
                      context_tokens=99,
                      flops=1.0, bytes=2.0)
    with TraceWriter(path) as w:
        w.write(MetaRecord(host="h", gpus=(GpuInfo("GPU-9", 0, "x"),)))
        w.write(step)
    trace = read_trace(path)
    assert trace.steps == [step]
    assert trace.gpu_uuids() == ["GPU-9"]
