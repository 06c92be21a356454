"""The engine on CUDA: bf16, and the paged path agrees with the dense reference within bf16 tolerance."""

from __future__ import annotations

import random

import pytest
import torch

from phaselens.engine.config import BYTE_BOS_ID, preset
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.model import LlamaModel
from phaselens.engine.sampling_params import SamplingParams
from phaselens.kernels import AttentionMetadata

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny", "llama-3.2-1b"])
def test_paged_chunks_match_dense_logits_in_bf16(name: str) -> None:
    cfg = preset(name)
    dev = torch.device("cuda:0")
    model = LlamaModel.random(cfg, dev, seed=0, max_positions=1024)
    assert model.dtype is torch.bfloat16 and model.embed_tokens.dtype is torch.bfloat16
    bs = 16
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1)).to(dev)
    ref = model.forward_dense(ids)
    cache = torch.zeros(cfg.num_layers, 2, 32, bs, cfg.num_kv_heads, cfg.head_dim, device=dev,
                        dtype=torch.bfloat16)
    table = torch.randperm(32, generator=torch.Generator().manual_seed(2)).to(dev)  # scattered blocks
    done, got = 0, []
    for chunk in (128, 100, 1, 1, 70):
        pos = torch.arange(done, done + chunk, device=dev)
        nb = -(-(done + chunk) // bs)
        meta = AttentionMetadata(block_size=bs, num_decodes=int(chunk == 1), query_lens=[chunk],
                                 context_lens=[done], slot_mapping=table[pos // bs] * bs + pos % bs,
                                 block_tables=table[None, :nb],
                                 decode_seq_lens=torch.tensor([done + 1], device=dev))
        got.append(model.compute_logits(model(ids[done:done + chunk], pos, meta, cache)))
        done += chunk
    got_all = torch.cat(got)
    rel = float((got_all - ref).norm() / ref.norm())
    assert rel < 2e-2, f"relative error {rel:.3g} of paged vs dense logits in bf16"
    assert float((got_all.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9


def test_engine_on_cuda_generates_what_the_dense_model_would() -> None:
    e = LLMEngine(EngineConfig(model="tiny", device="cuda:0", max_num_batched_tokens=64, block_size=16,
                               gpu_memory_utilization=0.05, shim_enabled=False))
    assert e.worker.dtype is torch.bfloat16 and e.worker.kv_cache.is_cuda
    rng = random.Random(0)
    prompts = [[BYTE_BOS_ID] + [rng.randrange(256) for _ in range(rng.randint(5, 150))] for _ in range(8)]
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=16, ignore_eos=True))
    final = {}
    while e.has_unfinished_requests():
        for o in e.step():
            if o.finished:
                final[o.request_id] = o
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    model = e.worker.model
    for i, p in enumerate(prompts):
        out = final[f"r{i}"].output_token_ids
        logits = model.forward_dense(torch.tensor(p + out, device="cuda:0"))[len(p) - 1:-1]
        chosen = logits.gather(1, torch.tensor(out, device="cuda:0")[:, None]).squeeze(1)
        # teacher-forced: each token the engine chose is the dense argmax up to bf16 rounding of the logits
        gap = logits.max(-1).values - chosen
        assert float(gap.max()) <= 0.1 * float(logits.std()), f"request {i}: gaps {gap.tolist()}"


def test_step_syncs_the_host_only_to_read_the_sampled_ids() -> None:
    e = LLMEngine(EngineConfig(model="tiny", device="cuda:0", gpu_memory_utilization=0.05,
                               shim_enabled=False))
    e.add_request("g", [BYTE_BOS_ID, 1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    e.add_request("s", [BYTE_BOS_ID, 4, 5], SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=1,
                                                           ignore_eos=True))
    runner = e.worker.runner
    prepare, run = runner.prepare, runner.run

    def strict(fn):
        def wrapped(*a, **kw):
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped

    runner.prepare, runner.run = strict(prepare), strict(run)  # type: ignore[method-assign]
    steps = 0
    while e.has_unfinished_requests():
        e.step()
        steps += 1
    assert steps >= 4


def test_new_step_shapes_compile_no_kernel_after_start_up() -> None:
    """Random prompt lengths arriving a few at a time give prefill, mixed and decode steps of ever-new shapes;
    none may compile a Triton specialization (a compile stalls the step for 0.5-1 s on an H100)."""
    from phaselens.kernels.paged_attention import compiled_variants

    e = LLMEngine(EngineConfig(model="tiny", device="cuda:0", max_num_batched_tokens=128, block_size=16,
                               num_kv_blocks=1024, shim_enabled=False))
    at_start = compiled_variants()
    rng = random.Random(3)
    pending = [[BYTE_BOS_ID] + [rng.randrange(256) for _ in range(rng.randint(1, 300))] for _ in range(40)]
    while pending or e.has_unfinished_requests():
        for _ in range(min(len(pending), rng.choice((0, 1, 1, 2, 3)))):
            e.add_request(f"r{len(pending)}", pending.pop(), SamplingParams(max_tokens=8, ignore_eos=True))
        if e.has_unfinished_requests():
            e.step()
    assert compiled_variants() == at_start
