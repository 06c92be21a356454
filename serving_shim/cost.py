"""Analytic cost of one engine step: FLOPs and DRAM bytes, from the model shape alone.

The figures feed the per-phase MFU and MBU of DESIGN.md ("Exact per-phase MFU/MBU come from the steps
themselves: ``flops / (t1 - t0) / peak``"), so they count the useful work of a Llama-architecture step,
not what a particular kernel happens to execute (a kernel that computes masked-out attention tiles does
more arithmetic than this; that extra is waste, not work).

Notation: ``L`` layers, ``h`` hidden size, ``i`` intermediate size, ``V`` vocabulary, ``q = heads *
head_dim``, ``kv = kv_heads * head_dim``, ``b`` bytes per element (``dtype_bytes``, weights and KV cache
alike), ``T`` tokens in the step (all prefill chunk tokens plus one per decode), ``S`` sequences that produce
a token this step (every decode; a prefill chunk only when it finishes its prompt), and for every sequence
its *attended context*: the keys its new tokens attend to.

* A prefill chunk of ``n`` tokens on top of ``p`` cached tokens is causal within the chunk: its token ``j``
  (``0 <= j < n``) attends to ``p + j + 1`` keys, ``sum = n*p + n*(n+1)/2`` query-key pairs; its attended
  context is ``p + n`` keys.
* A decode on top of ``c`` cached tokens attends to ``c + 1`` keys (its own included): ``c + 1`` pairs and
  ``c + 1`` context.

FLOPs (a multiply-add is 2 FLOPs)::

    linear    = 2 * T * L * (h*(q + 2*kv) + q*h + 3*h*i)        # QKV, O, gate/up/down projections
    lm_head   = 2 * S * h * V                                   # logits only where a token is sampled
    attention = 4 * L * q * sum(query-key pairs)                # QK^T and PV, 2 FLOPs per MAC each

RMSNorm, RoPE, SwiGLU's elementwise product, softmax and sampling are ignored: they are O(T*h) against the
O(T*h*h) of the projections (under 1% for every preset).

Bytes (DRAM traffic)::

    weights   = b * (L*(h*(q + 2*kv) + q*h + 3*h*i + 2*h) + h)  # all layers + final norm, read once
              + b * h * V   if S > 0                            # the LM head (the embedding table when tied)
    embedding = b * T * h                                       # only the looked-up rows of the table
    kv_read   = b * 2 * L * kv * sum(attended context)          # K and V of every attended key, read once
    kv_write  = b * 2 * L * kv * T                              # K and V of every new token

Activations are ignored: between kernels they are O(T*h) per layer and mostly stay in L2 for the small T
of decode; for long prefills they are a few percent of the weights' traffic at most, and counting them
would tie the figure to one implementation's fusion choices. Weights are counted once per step however
many tokens the step carries (that is why decode is memory-bound and batching helps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from phaselens.engine.config import ModelConfig

#: A prefill chunk: ``(chunk_len, cached_ctx_before)``, or ``(chunk_len, cached_ctx_before, samples)`` where
#: ``samples`` says whether the chunk finishes its prompt and so produces a token (default True).
PrefillChunk = tuple[int, int] | tuple[int, int, bool]


def _layer_linear_params(cfg: ModelConfig) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i


def _unpack(chunk: Sequence[int | bool]) -> tuple[int, int, bool]:
    samples: object = True
    if len(chunk) == 2:
        n, p = chunk
    elif len(chunk) == 3:
        n, p, samples = chunk
    else:
        raise ValueError(f"a prefill chunk is (chunk_len, cached_ctx_before[, samples]), got {chunk!r}")
    n, p = int(n), int(p)
    if n <= 0 or p < 0:
        raise ValueError(f"prefill chunk needs chunk_len > 0 and cached_ctx_before >= 0, got {chunk!r}")
    return n, p, bool(samples)


@dataclass(frozen=True)
class StepShape:
    """What a step carries: token counts, sequences, attended context and its cost."""

    prefill_tokens: int
    decode_tokens: int
    batch: int
    #: summed attended context: ``p + n`` per prefill chunk, ``c + 1`` per decode
    context_tokens: int
    #: sequences that produce a token (every decode, prefill chunks that finish their prompt)
    sampling_seqs: int
    flops: float
    bytes: float


#: :class:`StepShape`'s fields as a plain tuple, in its order (the shim's hot path builds no dataclass)
StepFigures = tuple[int, int, int, int, int, float, float]


def step_shape(model_config: ModelConfig, prefill_seqs: Sequence[PrefillChunk], decode_ctx: Sequence[int],
               dtype_bytes: int) -> StepShape:
    """Counts and cost of a step in one pass; see :func:`step_cost`. ValueError names a bad value."""
    return StepShape(*step_figures(model_config, prefill_seqs, decode_ctx, dtype_bytes))


def step_figures(model_config: ModelConfig, prefill_seqs: Sequence[PrefillChunk], decode_ctx: Sequence[int],
                 dtype_bytes: int) -> StepFigures:
    """:func:`step_shape` as a tuple ``(prefill_tokens, decode_tokens, batch, context_tokens, sampling_seqs,
    flops, bytes)``."""
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes}")
    prefill_tokens = context = sampling = pairs = 0
    for chunk in prefill_seqs:
        n, p, samples = _unpack(chunk)
        prefill_tokens += n
        context += p + n
        pairs += n * p + n * (n + 1) // 2
        sampling += samples
    decodes = len(decode_ctx)
    decode_context = sum(decode_ctx) + decodes
    if decodes and min(decode_ctx) < 0:
        raise ValueError(f"decode context must be >= 0, got {min(decode_ctx)}")
    context += decode_context
    pairs += decode_context
    sampling += decodes
    tokens = prefill_tokens + decodes
    flops = nbytes = 0.0
    if tokens:
        cfg = model_config
        h, L = cfg.hidden_size, cfg.num_layers
        linear = _layer_linear_params(cfg)
        flops = float(2 * tokens * L * linear + 2 * sampling * h * cfg.vocab_size
                      + 4 * L * cfg.q_size * pairs)
        weights = L * (linear + 2 * h) + h + (h * cfg.vocab_size if sampling else 0)
        kv_elems = 2 * L * cfg.kv_size * (context + tokens)  # read the attended context, write the new tokens
        nbytes = float(dtype_bytes * (weights + tokens * h + kv_elems))
    return prefill_tokens, decodes, len(prefill_seqs) + decodes, context, sampling, flops, nbytes


def step_cost(model_config: ModelConfig, prefill_seqs: Sequence[PrefillChunk], decode_ctx: Sequence[int],
              dtype_bytes: int) -> tuple[float, float]:
    """``(flops, bytes)`` of one step; formulas in the module docstring.

    ``prefill_seqs``: one ``(chunk_len, cached_ctx_before)`` per prefill chunk in the step (a third element
    ``False`` marks a chunk that does not finish its prompt, so produces no logits); ``decode_ctx``: the
    tokens already in the KV cache of each decoding sequence. ValueError names a bad value.
    """
    shape = step_shape(model_config, prefill_seqs, decode_ctx, dtype_bytes)
    return shape.flops, shape.bytes
