"""The torch reference paged attention against plain causal attention over contiguous K/V."""

from __future__ import annotations

import pytest
import torch

from phaselens.kernels import AttentionMetadata, dense_attention, paged_attention


def _scatter(k: torch.Tensor, num_blocks: int, bs: int, gen: torch.Generator):
    """Place one sequence's K ``[L, kvh, hd]`` in randomly chosen blocks; return cache and block table."""
    length, kvh, hd = k.shape
    cache = torch.randn(num_blocks, bs, kvh, hd, generator=gen)  # garbage everywhere else
    need = -(-length // bs)
    table = torch.randperm(num_blocks, generator=gen)[:need]
    flat = cache.view(-1, kvh, hd)
    pos = torch.arange(length)
    flat[table[pos // bs] * bs + pos % bs] = k
    return cache, table


@pytest.mark.parametrize("heads,kvh", [(4, 2), (4, 4), (8, 1)])
def test_decode_batch_matches_dense(heads: int, kvh: int) -> None:
    gen = torch.Generator().manual_seed(1)
    hd, bs, num_blocks = 16, 4, 64
    lens = [1, 5, 12, 30]  # context before the step; each decodes one more token
    k_cache = torch.zeros(num_blocks, bs, kvh, hd)
    v_cache = torch.zeros(num_blocks, bs, kvh, hd)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, refs, qs, ks, vs, slots = [], [], [], [], [], []
    for n in lens:
        total = n + 1
        q = torch.randn(total, heads, hd, generator=gen)
        k = torch.randn(total, kvh, hd, generator=gen)
        v = torch.randn(total, kvh, hd, generator=gen)
        table = [free.pop() for _ in range(-(-total // bs))]
        for p in range(n):  # the context is already cached
            k_cache[table[p // bs], p % bs] = k[p]
            v_cache[table[p // bs], p % bs] = v[p]
        slots.append(table[n // bs] * bs + n % bs)
        tables.append(table)
        refs.append(dense_attention(q, k, v, hd ** -0.5)[-1])
        qs.append(q[-1])
        ks.append(k[-1])
        vs.append(v[-1])
    width = max(map(len, tables))
    meta = AttentionMetadata(block_size=bs, num_decodes=len(lens), query_lens=[1] * len(lens),
                             context_lens=lens, slot_mapping=torch.tensor(slots),
                             block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                             decode_seq_lens=torch.tensor(lens) + 1)
    out = paged_attention(torch.stack(qs), torch.stack(ks), torch.stack(vs), k_cache, v_cache, meta,
                          hd ** -0.5)
    torch.testing.assert_close(out, torch.stack(refs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context,chunk", [(0, 9), (7, 5), (16, 16), (3, 1)])
def test_prefill_chunk_over_cached_prefix_matches_dense(context: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(2)
    heads, kvh, hd, bs = 4, 2, 8, 4
    total = context + chunk
    q = torch.randn(total, heads, hd, generator=gen)
    k = torch.randn(total, kvh, hd, generator=gen)
    v = torch.randn(total, kvh, hd, generator=gen)
    k_cache, table = _scatter(torch.cat([k[:context], torch.zeros(chunk, kvh, hd)]), 32, bs, gen)
    v_cache = torch.randn_like(k_cache)
    flat = v_cache.view(-1, kvh, hd)
    pos = torch.arange(context)
    flat[table[pos // bs] * bs + pos % bs] = v[:context]
    new = torch.arange(context, total)
    meta = AttentionMetadata(block_size=bs, num_decodes=0, query_lens=[chunk], context_lens=[context],
                             slot_mapping=table[new // bs] * bs + new % bs, block_tables=table[None, :])
    out = paged_attention(q[context:], k[context:], v[context:], k_cache, v_cache, meta, hd ** -0.5)
    ref = dense_attention(q, k, v, hd ** -0.5)[context:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the chunk's own keys and values were written to their slots
    torch.testing.assert_close(k_cache.view(-1, kvh, hd)[meta.slot_mapping], k[context:])
