"""The runner's packed step inputs equal a plain packing of the scheduled step, step after step.

The runner keeps block tables in a host array between steps and writes only what changed
(engine/model_runner.py); these tests compare every packed tensor with one built directly from the
``SchedulerOutput`` while tables grow, get replaced (preemption), shrink, and sequences come and go.
"""

from __future__ import annotations

import random

import torch

from phaselens.engine.config import preset
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.model import LlamaModel
from phaselens.engine.model_runner import ModelRunner, StepInputs
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import ScheduledSeq, SchedulerOutput
from phaselens.engine.sequence import Sequence
from phaselens.phase import Phase


def expected_inputs(out: SchedulerOutput, bs: int) -> dict[str, list]:
    """The step's inputs packed the plain way: decodes and chunks in order, tables padded with block 0."""
    sched = out.scheduled
    width = max(len(s.seq.block_table) for s in sched)
    ids, pos, slots, rows, index = [], [], [], [], []
    for i, s in enumerate(sched):
        for p in range(s.context_len, s.context_len + s.num_tokens):
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(s.seq.block_table[p // bs] * bs + p % bs)
        if s.context_len + s.num_tokens == len(s.seq):
            index.append(i)
            rows.append(len(ids) - 1)
    return {"input_ids": ids, "positions": pos, "slots": slots, "sample_rows": rows, "sample_index": index,
            "tables": [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in sched],
            "query_lens": [s.num_tokens for s in sched], "context_lens": [s.context_len for s in sched]}


def check(inputs: StepInputs, out: SchedulerOutput, bs: int) -> None:
    want = expected_inputs(out, bs)
    meta = inputs.meta
    assert inputs.input_ids.tolist() == want["input_ids"]
    assert inputs.positions.tolist() == want["positions"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert meta.block_tables.tolist() == want["tables"]
    assert inputs.sample_rows.tolist() == want["sample_rows"]
    assert inputs.sample_index == want["sample_index"]
    assert list(meta.query_lens) == want["query_lens"] and list(meta.context_lens) == want["context_lens"]
    nd = out.num_decodes
    assert meta.num_decodes == nd
    if nd:
        assert meta.decode_seq_lens is not None
        assert meta.decode_seq_lens.tolist() == [c + 1 for c in want["context_lens"][:nd]]
    if inputs.decode_block is not None:
        assert nd == len(out.scheduled)
        assert inputs.decode_block.tolist() == [want["input_ids"], want["positions"], want["slots"],
                                                [c + 1 for c in want["context_lens"]]]


def test_packed_inputs_match_through_growth_preemption_and_aborts() -> None:
    # block size 4 and contexts up to ~330 tokens: tables pass 64 blocks (the host array's first width);
    # 16 sequences at once pass its first 8 rows; 60 blocks for all of them force preemptions
    bs = 4
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", block_size=bs, num_kv_blocks=110,
                                    max_num_batched_tokens=48, max_num_seqs=16, shim_enabled=False))
    runner = engine.worker.runner
    prepare = runner.prepare
    seen = {Phase.DECODE: 0, Phase.MIXED: 0, Phase.PREFILL: 0}
    widest = [0]

    def checked(out: SchedulerOutput) -> StepInputs:
        inputs = prepare(out)
        check(inputs, out, bs)
        phase = out.phase
        assert phase is not None
        seen[phase] += 1
        widest[0] = max(widest[0], inputs.meta.block_tables.shape[1])
        return inputs

    runner.prepare = checked  # type: ignore[method-assign]
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(64)]
    n = 40
    for i in range(n):
        prompt = (shared[:rng.randrange(0, 64)] if i % 2 else []) + [rng.randrange(256)
                                                                     for _ in range(rng.randint(1, 120))]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 210), ignore_eos=True))
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        if step % 37 == 0:  # an abort mid-flight: its row is given back, later ones move up
            running = engine.scheduler.running
            if running:
                engine.abort_request(running[len(running) // 2].request_id)
    assert engine.stats().num_preemptions > 0
    assert widest[0] > 64 and all(v > 0 for v in seen.values()), (widest, seen)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_replaced_and_shrunk_tables_are_written_whole() -> None:
    cfg = preset("tiny")
    bs = 4
    model = LlamaModel.random(cfg, torch.device("cpu"), seed=0, max_positions=512)
    kv = torch.zeros(cfg.num_layers, 2, 64, bs, cfg.num_kv_heads, cfg.head_dim)
    runner = ModelRunner(model, kv, bs)
    a = Sequence("a", list(range(30)), SamplingParams(max_tokens=4), 0)
    b = Sequence("b", list(range(9)), SamplingParams(max_tokens=4), 0)
    a.block_table, b.block_table = list(range(10, 18)), [40, 41, 42]

    def decode_step(*seqs: Sequence) -> SchedulerOutput:
        return SchedulerOutput([ScheduledSeq(q, 1, len(q) - 1, False) for q in seqs])

    for out in (decode_step(a, b),
                decode_step(b, a)):  # the same sequences in the other order
        check(runner.prepare(out), out, bs)
    a.token_ids.append(7)
    a.block_table.append(18)  # grown in place by one block (8 -> 9 entries)
    b.block_table = [5, 6, 7]  # replaced by a list of the same length (a preemption and readmission)
    out = decode_step(a, b)
    check(runner.prepare(out), out, bs)
    a.token_ids[:] = a.token_ids[:6]
    a.block_table = [3, 4]  # replaced by a shorter list: the old entries past it must read 0
    out = decode_step(a, b)
    check(runner.prepare(out), out, bs)
    c = Sequence("c", list(range(3)), SamplingParams(max_tokens=4), 0)
    c.block_table = [60]
    out = decode_step(c)  # a and b leave; c takes a row
    check(runner.prepare(out), out, bs)
    out = decode_step(b, c)  # b comes back: written whole again
    check(runner.prepare(out), out, bs)
    # a prefill chunk beside a decode packs through the same rows
    d = Sequence("d", list(range(11)), SamplingParams(max_tokens=4), 0)
    d.block_table = [20, 21, 22]
    out = SchedulerOutput([ScheduledSeq(c, 1, 2, False), ScheduledSeq(d, 7, 4, True)])
    check(runner.prepare(out), out, bs)


def test_step_counts_follow_the_scheduled_list() -> None:
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=4), 0)
    out = SchedulerOutput()
    assert (out.phase, out.num_tokens, out.num_decodes) == (None, 0, 0)
    out.scheduled.append(ScheduledSeq(a, 1, 2, False))
    assert (out.phase, out.num_tokens, out.num_decodes) == (Phase.DECODE, 1, 1)
    out.scheduled.append(ScheduledSeq(a, 5, 0, True))
    assert (out.phase, out.num_tokens, out.num_decodes) == (Phase.MIXED, 6, 1)
    only_prefill = SchedulerOutput([ScheduledSeq(a, 3, 0, True)])
    assert (only_prefill.phase, only_prefill.num_tokens, only_prefill.num_decodes) == (Phase.PREFILL, 3, 0)
