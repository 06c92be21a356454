"""Torch reference paged attention: prefill chunks over cached prefixes, and batched decode (GQA).

The KV cache of one layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``; a
sequence's tokens live in the blocks its block table names, in order (vLLM's PagedAttention layout,
Kwon et al. 2023). This reference is vectorized over sequences for decode (blocks gathered into one padded
tensor, one ``scaled_dot_product_attention`` call) and runs one call per prefill chunk, so the host never
loops over tokens and never synchronizes. On CUDA the Triton kernels of ``paged_attention.py`` replace it
behind the same contract (``phaselens.kernels`` chooses); this version stays for the CPU and as the tests'
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass
class AttentionMetadata:
    """Where the tokens of one packed step sit, per sequence.

    The step's tokens are packed sequence after sequence, decodes first (one query token each), then
    prefill chunks. ``context_lens`` counts the tokens already in the cache before this step.
    """

    block_size: int
    num_decodes: int
    #: per sequence, host ints: query tokens of this step, and cached tokens before it
    query_lens: list[int]
    context_lens: list[int]
    #: [num_tokens] int64 on the device: cache slot (block * block_size + offset) of each new token
    slot_mapping: torch.Tensor
    #: [num_seqs, max_blocks] int64 on the device, padded with block 0 (masked out)
    block_tables: torch.Tensor
    #: [num_decodes] int64 on the device: tokens each decode attends to (its context plus itself)
    decode_seq_lens: torch.Tensor | None = None
    #: optional [num_seqs] int64 device copies of the per-sequence numbers (the runner sends them with the
    #: step's other inputs); built from the host lists on first use when absent
    query_starts_dev: torch.Tensor | None = None
    query_lens_dev: torch.Tensor | None = None
    context_lens_dev: torch.Tensor | None = None
    #: decode context slices of the Triton kernel; None: chosen from the batch shape (CUDA graphs fix it)
    decode_splits: int | None = None

    def __post_init__(self) -> None:
        if self.num_decodes and self.decode_seq_lens is None:
            raise ValueError("decode_seq_lens is required when there are decodes")
        self._decode_tables: torch.Tensor | None = None
        self._decode_mask: torch.Tensor | None = None

    def _build_decode_view(self) -> None:
        # the torch reference's padded decode tables and key mask: the same in every layer, built once
        nd = self.num_decodes
        assert self.decode_seq_lens is not None
        max_len = max(self.context_lens[:nd]) + 1
        nb = -(-max_len // self.block_size)
        self._decode_tables = self.block_tables[:nd, :nb]
        keys = torch.arange(nb * self.block_size, device=self.block_tables.device)
        self._decode_mask = (keys[None, :] < self.decode_seq_lens[:, None]).view(nd, 1, 1, -1)

    @property
    def decode_tables(self) -> torch.Tensor | None:
        """``[num_decodes, nb]``: the decodes' block tables cut to the longest decode (reference path)."""
        if self._decode_tables is None and self.num_decodes:
            self._build_decode_view()
        return self._decode_tables

    @property
    def decode_mask(self) -> torch.Tensor | None:
        """``[num_decodes, 1, 1, nb * block_size]``: valid keys of each decode (reference path)."""
        if self._decode_mask is None and self.num_decodes:
            self._build_decode_view()
        return self._decode_mask

    def device_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query start rows, query lengths and context lengths ``[num_seqs]`` (int64) on the device."""
        if self.query_lens_dev is None or self.context_lens_dev is None or self.query_starts_dev is None:
            starts = [0]
            for n in self.query_lens[:-1]:
                starts.append(starts[-1] + n)
            host = torch.tensor([starts, self.query_lens, self.context_lens], dtype=torch.int64)
            dev = host.to(self.block_tables.device)
            self.query_starts_dev, self.query_lens_dev, self.context_lens_dev = dev[0], dev[1], dev[2]
        return self.query_starts_dev, self.query_lens_dev, self.context_lens_dev

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values ``[num_tokens, kv_heads, head_dim]`` at their slots."""
    kvh, hd = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Blocks named by ``tables [B, nb]`` as one padded tensor ``[B, nb * block_size, kv_heads, hd]``."""
    b, nb = tables.shape
    g = cache[tables]  # [B, nb, block_size, kvh, hd]
    return g.reshape(b, nb * cache.shape[1], cache.shape[2], cache.shape[3])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: ``q [B, heads, head_dim]`` -> ``[B, heads, head_dim]``.

    ``tables [B, nb]`` names the blocks to read, ``mask [B, 1, 1, nb * block_size]`` the valid keys. The
    query heads of one KV head are laid out as the query-length axis of one SDPA call
    (``[B, kv_heads, group, head_dim]``), so grouped-query attention needs no copy of K and V per head.
    """
    b, heads, hd = q.shape
    kvh = k_cache.shape[2]
    k = _gather(k_cache, tables).transpose(1, 2)  # [B, kvh, L, hd]
    v = _gather(v_cache, tables).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(b, kvh, heads // kvh, hd), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, hd)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                      scale: float) -> torch.Tensor:
    """One prompt chunk of ``n`` tokens after ``context_len`` cached ones: ``q [n, heads, hd]`` -> same shape.

    Without a cached prefix the chunk attends to itself causally (``k``, ``v`` as computed); with one,
    keys come from the cache (the chunk's own were written there first) and query ``i`` sees keys
    ``0 .. context_len + i`` (a bottom-right aligned causal mask). Both forms run in the fused SDPA kernels
    (flash / memory-efficient) on the GPU; they need 4-D inputs, hence the leading batch axis of one.
    """
    n, heads, hd = q.shape
    kvh = k.shape[1]
    group = heads // kvh
    if context_len == 0:
        keys, values, mask, causal = k, v, None, True
    else:
        total = context_len + n
        nb = -(-total // k_cache.shape[1])
        tables = block_table[:nb].unsqueeze(0)
        keys = _gather(k_cache, tables)[0, :total]
        values = _gather(v_cache, tables)[0, :total]
        mask, causal = causal_lower_right(n, total), False
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                         scale=scale)
    return out[0].transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of one packed step; writes the new K/V into the cache first.

    ``q [T, heads, hd]``, ``k``/``v [T, kv_heads, hd]`` -> ``[T, heads, hd]``.
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    parts = []
    if nd:
        assert meta.decode_tables is not None and meta.decode_mask is not None
        parts.append(decode_attention(q[:nd], k_cache, v_cache, meta.decode_tables, meta.decode_mask, scale))
    start = nd
    for i in range(nd, len(meta.query_lens)):
        n = meta.query_lens[i]
        end = start + n
        parts.append(prefill_attention(q[start:end], k[start:end], v[start:end], k_cache, v_cache,
                                       meta.block_tables[i], meta.context_lens[i], scale))
        start = end
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention over one whole sequence, no cache: the correctness reference."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=scale)
    return out[0].transpose(0, 1)
