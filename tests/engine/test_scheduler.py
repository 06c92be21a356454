"""Scheduler invariants, driven without a model: budgets, order, phases, preemption, no leaks."""

from __future__ import annotations

import random

from phaselens.engine.block_manager import BlockManager
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import Scheduler
from phaselens.engine.sequence import Sequence
from phaselens.phase import Phase


def make(num_blocks: int, bs: int, budget: int, max_seqs: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, bs), budget, max_seqs)


def run_to_end(sched: Scheduler, seqs: list[Sequence], max_steps: int = 10_000) -> list:
    """Step with a fake model (token = step number) until every sequence has its max_tokens."""
    for s in seqs:
        sched.add(s)
    steps = []
    for step in range(max_steps):
        if not sched.has_unfinished():
            return steps
        out = sched.schedule()
        assert out.scheduled, "no progress"
        steps.append(out)
        sched.block_manager.check_invariants()
        for s in out.scheduled:  # blocks cover every token the step writes
            assert len(s.seq.block_table) * sched.block_manager.block_size >= s.context_len + s.num_tokens
        sched.update(out)
        for s in out.scheduled:
            if s.samples:
                s.seq.token_ids.append(step % 256)
                if s.seq.num_output_tokens >= s.seq.params.max_tokens:
                    sched.remove(s.seq)
    raise AssertionError("did not finish")


def random_seqs(n: int, rng: random.Random, max_prompt: int = 60, max_out: int = 20) -> list[Sequence]:
    return [Sequence(f"r{i}", [rng.randrange(256) for _ in range(rng.randint(1, max_prompt))],
                     SamplingParams(max_tokens=rng.randint(1, max_out)), i) for i in range(n)]


def test_budget_and_seq_limit_respected_and_nothing_leaks() -> None:
    rng = random.Random(0)
    sched = make(num_blocks=200, bs=4, budget=24, max_seqs=5)
    seqs = random_seqs(30, rng)
    steps = run_to_end(sched, seqs)
    assert all(o.num_tokens <= 24 for o in steps)
    assert all(len(o.scheduled) <= 5 for o in steps)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == 200


def test_decodes_first_then_prefills_and_phases() -> None:
    sched = make(num_blocks=100, bs=4, budget=8)
    a = Sequence("a", list(range(5)), SamplingParams(max_tokens=4), 0)
    b = Sequence("b", list(range(100, 130)), SamplingParams(max_tokens=2), 1)
    sched.add(a)
    out = sched.schedule()
    assert out.phase is Phase.PREFILL and [s.num_tokens for s in out.scheduled] == [5]
    sched.update(out)
    a.token_ids.append(1)
    sched.add(b)
    out = sched.schedule()
    # a's decode first, then b's first chunk within the budget of 8
    assert [(s.seq.request_id, s.num_tokens, s.is_prefill) for s in out.scheduled] == [("a", 1, False),
                                                                                       ("b", 7, True)]
    assert out.phase is Phase.MIXED
    assert out.prefill_seqs() == [(7, 0, False)] and out.decode_ctx() == [5]
    sched.update(out)
    a.token_ids.append(2)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.context_len) for s in out.scheduled] == [("a", 1, 6),
                                                                                        ("b", 7, 7)]
    sched.remove(b)  # aborted between schedule and update: skipped by update, its blocks freed
    sched.update(out)
    a.token_ids.append(3)
    out = sched.schedule()
    assert out.phase is Phase.DECODE


def test_preemption_under_a_tiny_pool_completes_everything() -> None:
    rng = random.Random(1)
    # 12 blocks of 4 = 48 tokens for 10 sequences of up to 30+15 tokens: preemption is certain
    sched = make(num_blocks=12, bs=4, budget=32)
    seqs = random_seqs(10, rng, max_prompt=30, max_out=15)
    steps = run_to_end(sched, seqs)
    assert sched.num_preemptions > 0
    assert any(o.preempted for o in steps)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == 12
    # a preempted sequence's recompute is a prefill of prompt and outputs so far
    again = [s for o in steps for s in o.scheduled
             if s.seq.num_preemptions and s.is_prefill and s.context_len == 0]
    assert again


def test_prefix_hits_are_counted_once_per_request() -> None:
    sched = make(num_blocks=64, bs=4, budget=64)
    prompt = list(range(20))
    first = Sequence("a", prompt, SamplingParams(max_tokens=2), 0)
    run_to_end(sched, [first])
    second = Sequence("b", prompt + [7], SamplingParams(max_tokens=2), 1)
    steps = run_to_end(sched, [second])
    assert second.num_cached_tokens == 20
    assert steps[0].scheduled[0].context_len == 20 and steps[0].scheduled[0].num_tokens == 1
    assert sched.prefix_hit_tokens == 20 and sched.prefix_query_tokens == 20 + 21
