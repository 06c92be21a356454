"""Sampling parameters and the sampler at their edges: what the API accepts must never crash a worker."""

from __future__ import annotations

import math

import pytest
import torch

from phaselens.engine.sampler import Sampler
from phaselens.engine.sampling_params import SamplingParams, SamplingParamsError

VOCAB = 258


def _sample(params: list[SamplingParams], seed: int = 7) -> torch.Tensor:
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    return Sampler().sample(logits, params, gens)


@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 1, 2**63 - 1, 2**63, 2**64, 10**40])
def test_top_k_past_the_vocabulary_is_no_cut(top_k: int) -> None:
    # 2**63 and up did not fit the sampler's int64 tensor: the worker died with every request on it
    off = [SamplingParams(temperature=1.0, top_k=0, seed=1), SamplingParams(temperature=0.7)]
    huge = [SamplingParams(temperature=1.0, top_k=top_k, seed=1), SamplingParams(temperature=0.7)]
    assert torch.equal(_sample(huge), _sample(off))


def test_a_temperature_too_small_for_the_dtype_is_greedy() -> None:
    # 1e-300 is 0 in float32: dividing the logits by it gave inf/NaN probabilities
    params = SamplingParams(temperature=1e-300, top_k=5)
    assert params.greedy
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    assert Sampler().sample(logits, [params], [None]).item() == logits.argmax().item()
    assert not SamplingParams(temperature=1e-3).greedy


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_p": math.inf}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ("",)}, "stop"),
    ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
])
def test_bad_sampling_params_name_their_field(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and isinstance(info.value, ValueError)


def test_engine_serves_any_integer_seed_and_top_k() -> None:
    # the API accepts any JSON integer: the engine folds seeds into 63 bits and the sampler clamps top_k
    from phaselens.engine.llm_engine import EngineConfig, LLMEngine

    e = LLMEngine(EngineConfig(model="tiny", shim_enabled=False))
    for i, value in enumerate((2**64, -(2**64), 2**63, 10**30)):
        params = SamplingParams(max_tokens=3, temperature=1.0, top_k=abs(value), seed=value, ignore_eos=True)
        e.add_request(f"r{i}", [1, 2, 3], params)
    done = {}
    while e.has_unfinished_requests():
        done.update({o.request_id: o for o in e.step() if o.finished})
    assert sorted(done) == ["r0", "r1", "r2", "r3"]
    assert all(len(o.output_token_ids) == 3 for o in done.values())
