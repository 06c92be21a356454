"""Decode CUDA graphs: the engine's greedy output with graphs equals its output without; padded batches;
no host synchronization inside a step (the sampled ids are read back by the engine, outside the step)."""

from __future__ import annotations

import random

import pytest
import torch

from phaselens.engine.config import BYTE_BOS_ID
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import ScheduledSeq, SchedulerOutput
from phaselens.engine.sequence import Sequence

pytestmark = pytest.mark.gpu


def _engine(model: str) -> LLMEngine:
    # no prefix caching: the second run must recompute every prompt exactly as the first did; a fixed cache
    # size (not a share of free memory): other tests in the process may still hold GPU memory
    return LLMEngine(EngineConfig(model=model, device="cuda:0", max_num_batched_tokens=256, max_num_seqs=24,
                                  block_size=16, num_kv_blocks=1024, max_model_len=1024,
                                  enable_prefix_caching=False, shim_enabled=False))


def _run(e: LLMEngine, tag: str, prompts: list[list[int]], lengths: list[int]) -> dict[int, list[int]]:
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        e.add_request(f"{tag}{i}", p, SamplingParams(max_tokens=n, ignore_eos=True))
    final: dict[int, list[int]] = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                final[int(o.request_id[len(tag):])] = o.output_token_ids
    return final


@pytest.mark.parametrize("model", ["tiny", "llama-3.2-1b"])
def test_greedy_output_with_graphs_equals_without(model: str) -> None:
    e = _engine(model)
    runner = e.worker.runner
    assert runner.graphs is not None, "the worker captures decode graphs on CUDA"
    assert runner.graphs.sizes[-1] == 24 and 1 in runner.graphs.sizes
    rng = random.Random(3)
    # 19 requests of different lengths: the decode batch shrinks through sizes that are not captured ones
    prompts = [[BYTE_BOS_ID] + [rng.randrange(3, 256) for _ in range(rng.randint(3, 120))] for _ in range(19)]
    lengths = [rng.randint(2, 40) for _ in prompts]
    with_graphs = _run(e, "g", prompts, lengths)
    replays = runner.graphs.num_replays
    assert replays > 30
    runner.use_cuda_graphs = False
    eager = _run(e, "e", prompts, lengths)
    assert runner.graphs.num_replays == replays
    assert with_graphs == eager
    assert all(len(with_graphs[i]) == n for i, n in enumerate(lengths))
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_steps_do_not_synchronize_the_host() -> None:
    e = _engine("tiny")
    runner = e.worker.runner
    rng = random.Random(4)
    seqs = []
    next_block = 0
    for i in range(5):
        ids = [rng.randrange(256) for _ in range(40 + 13 * i)]
        seq = Sequence(f"s{i}", ids, SamplingParams(max_tokens=4, temperature=0.8, seed=i), 0,
                       torch.Generator(device="cuda:0").manual_seed(i))
        nb = -(-(len(ids) + 1) // 16)
        seq.block_table = list(range(next_block, next_block + nb))
        next_block += nb
        seqs.append(seq)
    prefill = SchedulerOutput(scheduled=[ScheduledSeq(s, len(s.token_ids) - 1, 0, True) for s in seqs[:3]])
    mixed = SchedulerOutput(scheduled=[ScheduledSeq(s, 1, len(s.token_ids) - 1, False) for s in seqs[3:]]
                            + [ScheduledSeq(s, len(s.token_ids) - 1, 0, True) for s in seqs[:1]])
    decode = SchedulerOutput(scheduled=[ScheduledSeq(s, 1, len(s.token_ids) - 1, False) for s in seqs])
    for out in (prefill, mixed, decode):
        runner.run(out, runner.prepare(out))  # compiles and warms outside the check
    torch.cuda.synchronize()
    assert runner.replays(decode) and not runner.replays(mixed)
    before = runner.graphs.num_replays
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [runner.run(out, runner.prepare(out)) for out in (prefill, mixed, decode)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.graphs.num_replays == before + 1
    # one id per sequence that samples (a prompt chunk samples only when it finishes its prompt)
    want = [sum(s.samples for s in o.scheduled) for o in (prefill, mixed, decode)]
    assert [r.shape[0] for r in results] == want
    assert results[2].shape[0] == 5
