"""The analytic step cost against a hand computation for the `tiny` preset."""

from __future__ import annotations

import pytest

from phaselens.engine.config import preset
from phaselens.serving_shim.cost import step_cost, step_shape

TINY = preset("tiny")
# tiny: vocab V=258, hidden h=64, intermediate i=176, L=2 layers, 4 heads, 2 KV heads, head_dim 16
#   q = 4*16 = 64, kv = 2*16 = 32
#   linear params per layer = h*(q + 2kv) + q*h + 3*h*i = 64*128 + 64*64 + 3*64*176
#                           = 8192 + 4096 + 33792 = 46080
LINEAR = 46080


def test_tiny_shape_is_what_the_hand_computation_assumes() -> None:
    assert (TINY.vocab_size, TINY.hidden_size, TINY.intermediate_size, TINY.num_layers) == (258, 64, 176, 2)
    assert (TINY.q_size, TINY.kv_size) == (64, 32)


def test_mixed_step_matches_hand_computation() -> None:
    # One prefill chunk of 5 tokens on 3 cached ones (finishes its prompt), one decode on 7 cached tokens.
    # T = 6 tokens, 2 sequences sample.
    # query-key pairs: chunk 5*3 + 5*6/2 = 30, decode 7 + 1 = 8 -> 38
    # flops = 2*T*L*LINEAR + 2*S*h*V + 4*L*q*pairs = 2*6*2*46080 + 2*2*64*258 + 4*2*64*38
    #       = 1105920 + 66048 + 19456 = 1191424
    # bytes (float32, 4 B): weights L*(LINEAR + 2h) + h + h*V = 2*46208 + 64 + 16512 = 108992
    #       embedding rows T*h = 384; attended context (3+5) + (7+1) = 16; KV 2*L*kv*(16 + 6) = 2816
    #       (108992 + 384 + 2816) * 4 = 448768
    flops, nbytes = step_cost(TINY, [(5, 3)], [7], 4)
    assert flops == 1191424
    assert nbytes == 448768


def test_prefill_only_step() -> None:
    # Two fresh prompts of 4 and 2 tokens: T=6, S=2, pairs 4*5/2 + 2*3/2 = 10 + 3 = 13
    # flops = 2*6*2*46080 + 2*2*64*258 + 4*2*64*13 = 1105920 + 66048 + 6656 = 1178624
    # bytes (bf16, 2 B): 108992 + 6*64 + 2*2*32*((4+2) + 6) = 108992 + 384 + 1536 = 110912 -> 221824
    assert step_cost(TINY, [(4, 0), (2, 0)], [], 2) == (1178624.0, 221824.0)


def test_decode_only_step() -> None:
    # Three decodes on 10, 0, 5 cached tokens: T=3, S=3, pairs 11 + 1 + 6 = 18 = context
    # flops = 2*3*2*46080 + 2*3*64*258 + 4*2*64*18 = 552960 + 99072 + 9216 = 661248
    # bytes (4 B): 108992 + 3*64 + 2*2*32*(18 + 3) = 108992 + 192 + 2688 = 111872 -> 447488
    assert step_cost(TINY, [], [10, 0, 5], 4) == (661248.0, 447488.0)


def test_chunk_that_does_not_finish_its_prompt_has_no_lm_head() -> None:
    # A middle chunk of 4 tokens on 8 cached: no logits, so neither the LM head FLOPs nor its weights.
    # flops = 2*4*2*46080 + 4*2*64*(4*8 + 10) = 737280 + 21504 = 758784
    # bytes (4 B): 2*46208 + 64 + 4*64 + 2*2*32*(12 + 4) = 92480 + 256 + 2048 = 94784 -> 379136
    assert step_cost(TINY, [(4, 8, False)], [], 4) == (758784.0, 379136.0)


def test_shape_counts() -> None:
    # context: (3+5) + (0+2) + (7+1) + (0+1) = 19
    s = step_shape(TINY, [(5, 3), (2, 0, False)], [7, 0], 4)
    assert (s.prefill_tokens, s.decode_tokens, s.batch, s.context_tokens, s.sampling_seqs) == (7, 2, 4, 19, 3)


def test_empty_step_costs_nothing() -> None:
    assert step_cost(TINY, [], [], 4) == (0.0, 0.0)


@pytest.mark.parametrize("prefill, decode, dtype, word", [
    ([(0, 3)], [], 4, "chunk_len"), ([(2, -1)], [], 4, "cached_ctx_before"), ([], [-1], 4, "decode context"),
    ([(1,)], [], 4, "prefill chunk"), ([], [1], 0, "dtype_bytes"),
])
def test_bad_values_are_named(prefill: list, decode: list, dtype: int, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        step_cost(TINY, prefill, decode, dtype)
