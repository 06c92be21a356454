"""The whole engine (float32, CPU) against the naive full-recompute forward, token for token."""

from __future__ import annotations

import json
import random

import pytest
import torch

from phaselens.engine.config import BYTE_BOS_ID, BYTE_EOS_ID
from phaselens.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from phaselens.engine.sampling_params import SamplingParams
from phaselens.phase import Phase

_REF_CACHE: dict[tuple[int, ...], list[int]] = {}


def engine(**kw) -> LLMEngine:
    kw.setdefault("shim_enabled", False)
    return LLMEngine(EngineConfig(model="tiny", **kw))


def reference(e: LLMEngine, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the dense, cache-free forward (memoised: the tiny weights depend on seed 0 only)."""
    key = (*prompt, -n)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = e.worker.model.greedy_dense(prompt, n)
    return _REF_CACHE[key]


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BYTE_BOS_ID] + [rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_all(e: LLMEngine, prompts: list[list[int]], max_tokens: list[int],
            record: list | None = None) -> dict[str, RequestOutput]:
    """Add every prompt, step until done; final outputs by id; ``record`` gets a summary of each step."""
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True))
    if record is not None:
        schedule = e.scheduler.schedule

        def spy():
            out = schedule()
            record.append((out.num_tokens, len(out.scheduled), out.phase,
                           [s.num_tokens for s in out.scheduled]))
            return out
        e.scheduler.schedule = spy  # type: ignore[method-assign]
    final: dict[str, RequestOutput] = {}
    for _ in range(100_000):
        if not e.has_unfinished_requests():
            break
        for o in e.step():
            assert o.request_id not in final
            if o.finished:
                final[o.request_id] = o
    return final


def check_equal(e: LLMEngine, prompts, max_tokens, final) -> None:
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        got = final[f"r{i}"]
        assert got.finish_reason == "length" and len(got.output_token_ids) == m
        assert got.output_token_ids == reference(e, p, m), f"request {i} (prompt {len(p)} tokens) differs"


def test_batched_chunked_paged_engine_equals_dense_reference() -> None:
    e = engine(max_num_batched_tokens=32, block_size=4, max_num_seqs=8)
    prompts = random_prompts(12, seed=0)
    max_tokens = [random.Random(i).randint(1, 24) for i in range(12)]
    steps: list = []
    final = run_all(e, prompts, max_tokens, steps)
    check_equal(e, prompts, max_tokens, final)
    assert all(n <= 32 for n, *_ in steps), "token budget exceeded"
    assert all(b <= 8 for _, b, *_ in steps)
    phases = {p for *_, p, _ in steps}
    assert phases == {Phase.PREFILL, Phase.DECODE, Phase.MIXED}
    assert any(max(chunks) == 32 for *_, chunks in steps)  # long prompts really were chunked
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks, "leaked KV blocks"
    e.block_manager.check_invariants()
    st = e.stats()
    assert st.num_running == st.num_waiting == 0 and st.kv_usage == 0.0
    assert sum(st.steps_by_phase.values()) == len(steps)
    assert st.prefill_tokens == sum(map(len, prompts)) and st.decode_tokens == sum(max_tokens) - len(prompts)


def test_preemption_with_a_tiny_kv_pool_gives_the_same_output() -> None:
    # 16 blocks of 4 tokens: 64 tokens for 8 requests of up to 40 + 20 tokens
    e = engine(max_num_batched_tokens=24, block_size=4, num_kv_blocks=16)
    assert e.max_model_len == 64
    prompts = random_prompts(8, seed=1, lo=5, hi=39)
    max_tokens = [20] * 8
    final = run_all(e, prompts, max_tokens)
    assert e.stats().num_preemptions > 0
    check_equal(e, prompts, max_tokens, final)
    assert e.block_manager.num_free_blocks == 16
    e.block_manager.check_invariants()


def test_prefix_cache_hits_give_the_same_output() -> None:
    e = engine(max_num_batched_tokens=64, block_size=4)
    base = random_prompts(1, seed=2, lo=40, hi=40)[0]
    first = [base + [1, 2, 3], base + [4, 5]]
    run_all(e, first, [5, 5])
    # a second wave sharing the 41-token prefix (and one sharing the whole of a finished sequence)
    e2_prompts = [base + [9], base[:20] + [7, 7, 7], base + [1, 2, 3]]
    for i, p in enumerate(e2_prompts):
        e.add_request(f"s{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
    final = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                final[o.request_id] = o
    assert final["s0"].num_cached_tokens == 40 and final["s1"].num_cached_tokens == 20
    assert final["s2"].num_cached_tokens == 40
    for i, p in enumerate(e2_prompts):
        assert final[f"s{i}"].output_token_ids == reference(e, p, 6)
    st = e.stats()
    assert st.prefix_hit_tokens == 100 and st.prefix_query_tokens == sum(map(len, first + e2_prompts))
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_preemption_and_prefix_caching_together() -> None:
    e = engine(max_num_batched_tokens=16, block_size=4, num_kv_blocks=20)
    shared = random_prompts(1, seed=3, lo=24, hi=24)[0]
    prompts = [shared + p[1:] for p in random_prompts(6, seed=4, lo=1, hi=30)] + random_prompts(3, seed=5)
    prompts = [p[:60] for p in prompts]
    max_tokens = [20 - (len(p) > 50) * 5 for p in prompts]
    max_tokens = [min(m, 80 - len(p)) for m, p in zip(max_tokens, prompts)]
    final = run_all(e, prompts, max_tokens)
    assert e.stats().num_preemptions > 0 and e.stats().prefix_hit_tokens > 0
    check_equal(e, prompts, max_tokens, final)
    assert e.block_manager.num_free_blocks == 20


def test_sampling_seed_is_per_request_whatever_the_batch() -> None:
    e = engine()
    p = random_prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    e.add_request("alone", p, params)
    alone = run_all(e, [], [])
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                alone[o.request_id] = o
    e.add_request("batched", p, params)
    for i, q in enumerate(random_prompts(5, seed=7)):
        e.add_request(f"other{i}", q, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
    batched = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                batched[o.request_id] = o
    assert alone["alone"].output_token_ids == batched["batched"].output_token_ids
    assert alone["alone"].output_token_ids != reference(e, p, 12)  # it really sampled


def test_top_k_one_is_greedy_and_top_k_limits_choices() -> None:
    e = engine()
    p = random_prompts(1, seed=8)[0]
    out = e.generate(["x"], SamplingParams(max_tokens=1))[0]
    assert len(out.output_token_ids) == 1
    e.add_request("k1", p, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True))
    e.add_request("p0", p, SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, seed=3,
                                          ignore_eos=True))
    final = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                final[o.request_id] = o
    ref = reference(e, p, 10)
    assert final["k1"].output_token_ids == ref and final["p0"].output_token_ids == ref
    # top_k=3: every sampled token is among the 3 most likely under the dense model
    e.add_request("k3", p, SamplingParams(max_tokens=10, temperature=2.0, top_k=3, seed=5, ignore_eos=True))
    got = []
    while e.has_unfinished_requests():
        for o in e.step():
            got = o.output_token_ids
    ids = list(p)
    for tok in got:
        top3 = e.worker.model.forward_dense(torch.tensor(ids))[-1].topk(3).indices.tolist()
        assert tok in top3
        ids.append(tok)


def test_stop_strings_and_eos() -> None:
    e = engine()
    p = random_prompts(1, seed=9)[0]
    ref = reference(e, p, 30)
    text = e.tokenizer.decode(ref)
    # a stop string taken from the middle of the greedy output
    stop = next(text[i:i + 2] for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text.find(text[i:i + 2]) == i)
    e.add_request("s", p, SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True))
    last = None
    while e.has_unfinished_requests():
        for o in e.step():
            last = o
    assert last.finish_reason == "stop" and last.finished
    assert last.text == text[:text.find(stop)]
    assert stop not in last.text
    # EOS: among many random prompts some greedy continuations reach EOS; they stop there, EOS not in the text
    qs = random_prompts(64, seed=100, lo=1, hi=8)
    for i, q in enumerate(qs):
        e.add_request(f"eos{i}", q, SamplingParams(max_tokens=40))
    final = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                final[o.request_id] = o
    stopped = [int(k[3:]) for k, o in final.items() if o.finish_reason == "stop"]
    if not stopped:
        pytest.skip("no greedy EOS among 64 random prompts of the tiny model")
    for i in stopped[:3]:
        out = final[f"eos{i}"]
        assert out.output_token_ids[-1] == BYTE_EOS_ID
        assert out.output_token_ids == e.worker.model.greedy_dense(qs[i], 40, (BYTE_EOS_ID,))
        assert out.text == e.tokenizer.decode(out.output_token_ids)


def test_streamed_outputs_add_up() -> None:
    e = engine(max_num_batched_tokens=16)
    prompts = random_prompts(3, seed=10)
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=7, ignore_eos=True))
    seen: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    while e.has_unfinished_requests():
        for o in e.step():
            seen[o.request_id] += o.new_token_ids
            assert seen[o.request_id] == o.output_token_ids
            assert o.num_prompt_tokens == len(prompts[int(o.request_id[1:])])
    assert all(len(v) == 7 for v in seen.values())


def test_abort_frees_blocks_at_once() -> None:
    e = engine()
    e.add_request("a", random_prompts(1, seed=11, lo=50, hi=50)[0], SamplingParams(max_tokens=50))
    e.add_request("b", random_prompts(1, seed=12, lo=50, hi=50)[0], SamplingParams(max_tokens=50))
    e.step()
    e.step()
    assert e.block_manager.num_free_blocks < e.block_manager.num_blocks
    e.abort_request("a")
    e.abort_request("b")
    e.abort_request("unknown")  # ignored
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    assert not e.has_unfinished_requests()
    assert e.step() == []


def test_bad_requests_and_configs_are_value_errors() -> None:
    e = engine(num_kv_blocks=8, block_size=4)
    assert e.max_model_len == 32
    with pytest.raises(ValueError, match="empty"):
        e.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the context of 32"):
        e.add_request("x", [1] * 20, SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="300"):
        e.add_request("x", [1, 300], SamplingParams())
    e.add_request("x", [1], SamplingParams())
    with pytest.raises(ValueError, match="already"):
        e.add_request("x", [1], SamplingParams())
    with pytest.raises(ValueError, match="unknown preset 'nope'|neither a preset"):
        LLMEngine(EngineConfig(model="nope", shim_enabled=False))
    with pytest.raises(ValueError, match="max_model_len=64 does not fit"):
        engine(num_kv_blocks=8, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        engine(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_shim_gets_one_record_per_step(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    e = LLMEngine(EngineConfig(model="tiny", shim_jsonl_path=str(path),
                               shim_socket_path=str(tmp_path / "none.sock"), max_num_batched_tokens=16))
    prompts = random_prompts(3, seed=13)
    run_all(e, prompts, [4, 4, 4])
    e.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    st = e.stats()
    assert len(steps) == sum(st.steps_by_phase.values())
    by_phase = {p.value: n for p, n in st.steps_by_phase.items() if n}
    assert {p: sum(1 for s in steps if s["phase"] == p) for p in by_phase} == by_phase
    assert all(s["clock"] == "host" and s["gpu_uuid"] == "GPU-sim-0" for s in steps)
    assert sum(s["prefill_tokens"] for s in steps) == sum(map(len, prompts))
    assert e.shim.stats.dropped >= len(steps)  # nobody listens on the socket: dropped, counted, no error


def test_cpu_threads_policy() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        engine()  # tiny: under 100M parameters, so one thread
        assert torch.get_num_threads() == 1
        engine(cpu_threads=2)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="cpu_threads must be an integer >= 1, got 0"):
            engine(cpu_threads=0)
    finally:
        torch.set_num_threads(before)


def test_aborts_mid_flight_leave_the_others_exact_and_no_blocks_behind() -> None:
    # small pool and budget: aborted requests are waiting, mid-prefill, decoding or preempted when they go
    e = engine(max_num_batched_tokens=16, block_size=4, num_kv_blocks=24)
    prompts = random_prompts(10, seed=14, lo=5, hi=50)
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=12, ignore_eos=True))
    doomed = {"r1": 1, "r4": 3, "r7": 6, "r9": 0}  # request -> step after which it is aborted
    final: dict[str, RequestOutput] = {}
    step = 0
    while e.has_unfinished_requests():
        for rid, at in doomed.items():
            if at == step:
                e.abort_request(rid)
        for o in e.step():
            if o.finished:
                final[o.request_id] = o
        e.block_manager.check_invariants()
        step += 1
    assert not set(doomed) & set(final)
    for i, p in enumerate(prompts):
        if f"r{i}" not in doomed:
            assert final[f"r{i}"].output_token_ids == reference(e, p, 12)
    assert e.block_manager.num_free_blocks == 24
