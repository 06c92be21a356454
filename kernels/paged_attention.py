"""Triton paged attention for CUDA: KV store, batched decode (GQA, split over the context) and packed prefill.

Same layout and contract as the torch reference in :mod:`phaselens.kernels.attention`: the KV cache of one
layer is ``[num_blocks, block_size, kv_heads, head_dim]`` and a sequence's tokens live in the blocks its
block table names. The kernels read K/V straight from the blocks (token ``j`` of a sequence is at block
``table[j // block_size]``, offset ``j % block_size``), so nothing is gathered into a padded copy first:
the reference's gather was 35% of an 8B batch-64 decode step on the H100 (bench/RESULTS.md).

- :func:`store_kv`: one launch writes the step's new keys and values; a negative slot is skipped (the
  padded rows of a CUDA-graph batch).
- :func:`decode_attention`: one query token per sequence. A program takes one sequence, one KV head and
  all the query heads of its group (GQA: K and V are read once per group, and the group's query rows form
  the ``M`` side of a tensor-core dot), over one of ``splits`` slices of the context; a second kernel merges
  the slices' partial softmaxes (flash-decoding, Dao et al. 2023). Splits keep the GPU busy at batch 1,
  where sequences times KV heads alone are 8 programs on 132 SMs. Each slice's length is computed on the
  device from the sequence length, so a CUDA graph captured once serves every context length.
- :func:`prefill_attention`: the packed prefill chunks of a step in one launch, each chunk after its cached
  prefix (keys ``0 .. context_len + i`` for the chunk's query ``i``), flash-attention style online softmax.

The online softmax works in base 2 (``exp2`` with the scale folded into ``log2(e)``), as FlashAttention-2
and vLLM's Triton kernels do.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton
import triton.language as tl

from phaselens.kernels.attention import AttentionMetadata, dense_attention

#: ``log2(e)``: softmax in base 2 (``exp(x) = exp2(x * log2 e)``)
LOG2E = 1.4426950408889634
#: keys per tile and warps of the decode kernel
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
#: query rows and keys per tile of the prefill kernel
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2
#: the decode kernel aims at this many programs (about two per SM of an H100: 132 SMs)
TARGET_PROGRAMS = 264
MAX_SPLITS = 16

# Triton specializes every pointer argument on 16-byte alignment, and each new combination compiles a new
# kernel (about 0.5-1 s on an H100, the GPU idle meanwhile). The per-sequence metadata below are slices of one
# packed host-to-device buffer (engine/model_runner.py), so their alignment changes with the step's token and
# sequence counts: a serving run with random prompt lengths kept meeting new combinations, and 110-token
# prefills and mixed steps took 0.6-1.3 s (bench/RESULTS.md, 2026-11-23 03:57). These pointers are read
# element by element, so alignment buys them nothing: without it one kernel serves every step shape.
# (``do_not_specialize_on_alignment`` is Triton >= 3.2; older Triton has only ``do_not_specialize``.)
_NO_ALIGN_KW = next(k for k in ("do_not_specialize_on_alignment", "do_not_specialize")
                    if k in inspect.signature(triton.jit).parameters)


def _jit(no_value: tuple[str, ...] = (), no_align: tuple[str, ...] = ()) -> Any:
    """``triton.jit`` with no value specialization on ``no_value`` and no alignment specialization on the
    ``no_align`` pointers."""
    if _NO_ALIGN_KW == "do_not_specialize":
        return triton.jit(do_not_specialize=[*no_value, *no_align])
    return triton.jit(do_not_specialize=list(no_value), do_not_specialize_on_alignment=list(no_align))


@_jit(no_align=("slot_ptr",))
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=dm)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=dm)
    tl.store(kc_ptr + slot * stride_cs + h * stride_ch + d, k, mask=dm)
    tl.store(vc_ptr + slot * stride_cs + h * stride_ch + d, v, mask=dm)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store ``k``/``v [num_tokens, kv_heads, head_dim]`` at their cache slots (``block * block_size +
    offset``); tokens whose slot is negative are skipped."""
    t, kvh, hd = k.shape
    if t == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("store_kv: the head dimension of k and v must be contiguous")
    kc = k_cache.view(-1, kvh, hd)
    vc = v_cache.view(-1, kvh, hd)
    _store_kv_kernel[(t, kvh)](k, v, kc, vc, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               kc.stride(0), kc.stride(1), HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd))


# the block table's row stride is the step's widest table: not specialized on, so a new width compiles nothing
@_jit(no_value=("stride_tb",), no_align=("table_ptr", "seq_lens_ptr"))
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                   qk_scale, stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb,
                   stride_ob, stride_oh,
                   BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    # this program's slice of the context, whole tiles long
    per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, seq_len)

    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    heads = g * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = table_ptr + b.to(tl.int64) * stride_tb
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        ok = keys < end
        blk = tl.load(table + keys // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        off = blk * stride_cb + (keys % BLOCK_SIZE) * stride_ct + g * stride_ch
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SPLITS == 1:
        # an empty sequence (a padded graph row) has l == 0: write zeros, not NaN
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials [B, heads, SPLITS, BLOCK_D] and (m, l) [B, heads, SPLITS, 2], contiguous
        num_heads = tl.num_programs(1) * GROUP
        base = (b * num_heads + heads) * SPLITS + s
        tl.store(part_o_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    sp = tl.arange(0, BLOCK_S)
    sp_ok = sp < SPLITS
    base = (b * num_heads + h) * SPLITS + sp
    m = tl.load(part_ml_ptr + base * 2, mask=sp_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + base * 2 + 1, mask=sp_ok, other=0.0)
    m_max = tl.max(m, 0)
    # slices past the end of a sequence have m = -inf and l = 0; all of them (an empty row): zeros
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    total = tl.sum(l_s * w, 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_o_ptr + base[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_splits(batch: int, kv_heads: int, max_len: int | None = None) -> int:
    """How many context slices per (sequence, KV head): enough programs to fill the GPU, at most
    :data:`MAX_SPLITS`, and no more than the longest context has tiles (when known). A function of the batch
    shape only (``max_len`` aside), so eager steps and CUDA-graph replays split the same way."""
    splits = max(1, min(MAX_SPLITS, -(-TARGET_PROGRAMS // (batch * kv_heads))))
    if max_len is not None:
        splits = max(1, min(splits, -(-max_len // DECODE_BLOCK_N)))
    return triton.next_power_of_2(splits) if splits > 1 else 1


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence: ``q [B, heads, head_dim]`` -> ``[B, heads, head_dim]``.

    ``block_tables [B, >= blocks]`` (int32 or int64), ``seq_lens [B]``: keys each sequence attends to (its
    context plus itself; 0 gives a zero row). ``splits``: context slices (default :func:`decode_splits`).
    ``out``: where to write (default a new tensor); its head dimension must be contiguous.
    """
    b, heads, hd = q.shape
    if out is None:
        out = torch.empty(b, heads, hd, device=q.device, dtype=q.dtype)
    if b == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    _, bs, kvh, _ = k_cache.shape
    group = heads // kvh
    if splits is None:
        splits = decode_splits(b, kvh)
    block_d = triton.next_power_of_2(hd)
    if splits > 1:
        part_o = torch.empty(b, heads, splits, block_d, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(b, heads, splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out  # unused
    _decode_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_ml, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=bs, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd,
        BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, SPLITS=splits, num_warps=DECODE_NUM_WARPS)
    if splits > 1:
        _decode_reduce_kernel[(b, heads)](part_o, part_ml, out, out.stride(0), out.stride(1), HEAD_DIM=hd,
                                          BLOCK_D=block_d, SPLITS=splits, BLOCK_S=splits, num_warps=4)
    return out


@_jit(no_value=("stride_tb",), no_align=("table_ptr", "q_start_ptr", "q_len_ptr", "ctx_ptr"))
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, q_start_ptr, q_len_ptr, ctx_ptr, out_ptr, qk_scale,
                    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ot, stride_oh,
                    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mt = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    q_len = tl.load(q_len_ptr + p).to(tl.int32)
    if mt * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + p).to(tl.int64)
    ctx = tl.load(ctx_ptr + p).to(tl.int32)
    g = h // GROUP
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = table_ptr + p.to(tl.int64) * stride_tb
    # query row i (chunk position) sees keys 0 .. ctx + i; this tile's last row bounds the loop
    end = ctx + tl.minimum((mt + 1) * BLOCK_M, q_len)
    # keys below ctx + mt * BLOCK_M are visible to every row of the tile: no causal mask there
    full_end = ctx + mt * BLOCK_M
    for n0 in range(0, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        ok = keys < end
        blk = tl.load(table + keys // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        off = blk * stride_cb + (keys % BLOCK_SIZE) * stride_ct + g * stride_ch
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if n0 + BLOCK_N > full_end:
            visible = (keys[None, :] <= ctx + rows[:, None]) & ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
                      context_lens: torch.Tensor, max_query_len: int, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed prefill chunks in one launch, their own keys already stored in the cache.

    ``q [T, heads, hd]`` holds the chunks' query rows; chunk ``p`` starts at row ``query_starts[p]`` and has
    ``query_lens[p]`` rows, after ``context_lens[p]`` cached tokens; ``block_tables [P, >= blocks]``. Rows
    of ``out`` (default a new ``[T, heads, hd]`` tensor) outside the chunks are left as they were.
    """
    t, heads, hd = q.shape
    if out is None:
        out = torch.empty_like(q)
    n = query_lens.shape[0]
    if n == 0 or max_query_len == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    _, bs, kvh, _ = k_cache.shape
    grid = (-(-max_query_len // PREFILL_BLOCK_M), heads, n)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=bs, GROUP=heads // kvh, HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd),
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, num_warps=PREFILL_NUM_WARPS,
        num_stages=PREFILL_NUM_STAGES)
    return out


#: None: every prefill chunk runs in the one Triton launch. A number: a step whose chunks all start a prompt
#: (no cached prefix) and are at least this long runs them through torch SDPA instead, one call each (kept
#: for A/B: on the H100 the Triton kernel took 134 us per 8B layer for a 2048-token chunk, SDPA's flash
#: backend 203 us and cuDNN 124 us, and the whole 2048-token prefill step was 55.8 ms with Triton against
#: 58.5 ms with flash; bench/RESULTS.md 2026-11-23, issue 7)
PREFILL_SDPA_MIN_TOKENS: int | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of one packed step (decodes first, then prefill chunks); writes the new K/V first.

    ``q [T, heads, hd]``, ``k``/``v [T, kv_heads, hd]`` -> ``[T, heads, hd]``; the contract of the torch
    reference :func:`phaselens.kernels.attention.paged_attention`.
    """
    store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    t = q.shape[0]
    if nd == t:
        assert meta.decode_seq_lens is not None
        return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.decode_seq_lens, scale,
                                splits=meta.decode_splits)
    out = torch.empty_like(q)
    if nd:
        assert meta.decode_seq_lens is not None
        decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.decode_seq_lens, scale,
                         splits=meta.decode_splits, out=out[:nd])
    qlens, ctx = meta.query_lens[nd:], meta.context_lens[nd:]
    sdpa_min = PREFILL_SDPA_MIN_TOKENS
    if sdpa_min is not None and all(c == 0 for c in ctx) and min(qlens) >= sdpa_min:
        start = nd
        for n in qlens:
            out[start:start + n] = sdpa_prefill(q[start:start + n], k[start:start + n], v[start:start + n],
                                                scale)
            start += n
        return out
    starts, qlens_dev, ctx_dev = meta.device_lists()
    prefill_attention(q, k_cache, v_cache, meta.block_tables[nd:], starts[nd:], qlens_dev[nd:], ctx_dev[nd:],
                      max(qlens), scale, out=out)
    return out


def kernel_variants(*fns: Any) -> int:
    """How many specializations of the given Triton kernels have been compiled (or loaded from Triton's disk
    cache) in this process."""
    total = 0
    for fn in fns:
        caches = getattr(fn, "device_caches", None)  # Triton >= 3.0: device -> (kernel cache, ...)
        if caches is not None:
            total += sum(len(entry[0]) for entry in caches.values())
        else:
            total += sum(len(c) for c in getattr(fn, "cache", {}).values())
    return total


def compiled_variants() -> int:
    """How many specializations of the engine's Triton kernels (this module's and kernels/fused.py's) have
    been compiled in this process: a serving engine should reach its final count during warm-up."""
    from phaselens.kernels import fused

    return kernel_variants(_store_kv_kernel, _decode_kernel, _decode_reduce_kernel, _prefill_kernel) + \
        fused.compiled_variants()


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt's first chunk attending to itself causally, through torch SDPA (GQA heads expanded)."""
    return dense_attention(q, k, v, scale)
