"""Triton paged attention against the torch reference on the GPU (bf16): random shapes, block tables with
holes, GQA ratios 1, 4 and 8, split decode, packed prefill chunks after cached prefixes, padded rows.

The device and dtype come from ``PHASELENS_KERNEL_TEST_DEVICE`` (default ``cuda:0``, bf16). With ``cpu`` and
``TRITON_INTERPRET=1`` the same checks run in float32 in Triton's interpreter (how the kernels were developed
off the GPU; about a minute on one core):

    PHASELENS_KERNEL_TEST_DEVICE=cpu TRITON_INTERPRET=1 python -m pytest tests/kernels/test_gpu_paged_*.py
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from phaselens.kernels import AttentionMetadata
from phaselens.kernels import attention as ref

DEVICE = torch.device(os.environ.get("PHASELENS_KERNEL_TEST_DEVICE", "cuda:0"))
if DEVICE.type == "cuda":
    pytestmark = pytest.mark.gpu
else:
    pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                    reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
#: bf16 keeps 8 mantissa bits: a relative error of a few 1e-3 is rounding; 2e-2 catches a wrong key or scale
TOL = 2e-2 if DTYPE is torch.bfloat16 else 1e-4
BS = 16
GARBAGE = 50.0  # blocks nobody owns hold large values: a kernel reading them shows up at once


def _kernels():
    return pytest.importorskip("phaselens.kernels.paged_attention")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class Pool:
    """A KV cache whose sequences own scattered blocks; the blocks between them (holes) hold garbage."""

    def __init__(self, num_blocks: int, kv_heads: int, head_dim: int, rng: random.Random) -> None:
        shape = (num_blocks, BS, kv_heads, head_dim)
        self.k = torch.full(shape, GARBAGE, device=DEVICE, dtype=DTYPE)
        self.v = torch.full(shape, -GARBAGE, device=DEVICE, dtype=DTYPE)
        self.free = list(range(1, num_blocks))  # block 0 stays garbage: it pads the tables
        rng.shuffle(self.free)
        self.rng = rng

    def sequence(self, length: int) -> list[int]:
        """Blocks for ``length`` tokens, filled with random K/V; a random block is skipped now and then."""
        nb = -(-length // BS)
        table = [self.free.pop() for _ in range(nb)]
        if self.rng.random() < 0.5 and self.free:
            self.free.pop()  # a hole: a block nobody gets
        for i, blk in enumerate(table):
            n = min(BS, length - i * BS)
            self.k[blk, :n] = torch.randn(n, *self.k.shape[2:], device=DEVICE).to(DTYPE)
            self.v[blk, :n] = torch.randn(n, *self.v.shape[2:], device=DEVICE).to(DTYPE)
        return table


def _tables(tables: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = width or max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_matches_reference(group: int, seed: int) -> None:
    pa = _kernels()
    rng = random.Random(seed * 10 + group)
    kvh = rng.choice([1, 2, 8]) if group < 8 else rng.choice([1, 4])
    hd = rng.choice([64, 128])
    batch = rng.choice([1, 3, 7, 20])
    lens = [rng.randint(1, 700) for _ in range(batch)]
    pool = Pool(sum(-(-n // BS) for n in lens) * 2 + 2, kvh, hd, rng)
    tables = _tables([pool.sequence(n) for n in lens], width=-(-max(lens) // BS) + 3)
    seq_lens = torch.tensor(lens, device=DEVICE)
    q = torch.randn(batch, kvh * group, hd, device=DEVICE).to(DTYPE)
    scale = hd ** -0.5
    meta = AttentionMetadata(block_size=BS, num_decodes=batch, query_lens=[1] * batch,
                             context_lens=[n - 1 for n in lens], slot_mapping=torch.zeros(0),
                             block_tables=tables, decode_seq_lens=seq_lens)
    want = ref.decode_attention(q, pool.k, pool.v, meta.decode_tables, meta.decode_mask, scale)
    for splits in (None, 1, 4, 16):
        got = pa.decode_attention(q, pool.k, pool.v, tables, seq_lens, scale, splits=splits)
        assert got.shape == want.shape and got.dtype == want.dtype
        rel = _rel(got, want)
        assert rel < TOL, f"splits={splits} group={group} kvh={kvh} hd={hd} lens={lens}: rel error {rel:.3g}"


def test_decode_int32_tables_and_empty_rows_give_zeros() -> None:
    pa = _kernels()
    rng = random.Random(5)
    pool = Pool(64, 2, 128, rng)
    lens = [37, 0, 300, 0]  # 0: a padded CUDA-graph row
    tables = _tables([pool.sequence(n) if n else [] for n in lens], width=40).to(torch.int32)
    q = torch.randn(4, 8, 128, device=DEVICE).to(DTYPE)
    seq_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    for splits in (1, 8):
        got = pa.decode_attention(q, pool.k, pool.v, tables, seq_lens, 0.1, splits=splits)
        assert torch.isfinite(got.float()).all()
        assert float(got[1].abs().max()) == 0.0 and float(got[3].abs().max()) == 0.0
        for i in (0, 2):
            meta = AttentionMetadata(block_size=BS, num_decodes=1, query_lens=[1], context_lens=[lens[i] - 1],
                                     slot_mapping=torch.zeros(0), block_tables=tables[i:i + 1].long(),
                                     decode_seq_lens=seq_lens[i:i + 1].long())
            want = ref.decode_attention(q[i:i + 1], pool.k, pool.v, meta.decode_tables, meta.decode_mask, 0.1)
            assert _rel(got[i:i + 1], want) < TOL


@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_chunks_after_cached_prefixes_match_reference(group: int) -> None:
    pa = _kernels()
    rng = random.Random(100 + group)
    kvh = 2 if group < 8 else 1
    hd = 128
    # (chunk, cached prefix): a first chunk, chunks after prefixes, a one-token chunk, a long one
    chunks = [(rng.randint(1, 200), 0), (rng.randint(1, 150), rng.randint(1, 400)), (1, 77),
              (rng.randint(65, 300), rng.randint(0, 64)), (130, 0)]
    pool = Pool(sum(-(-(n + c) // BS) for n, c in chunks) * 2 + 2, kvh, hd, rng)
    tables = [pool.sequence(n + c) for n, c in chunks]
    table_t = _tables(tables)
    t = sum(n for n, _ in chunks)
    q = torch.randn(t, kvh * group, hd, device=DEVICE).to(DTYPE)
    starts, start = [], 0
    for n, _ in chunks:
        starts.append(start)
        start += n
    dev = torch.tensor([starts, [n for n, _ in chunks], [c for _, c in chunks]], device=DEVICE)
    scale = hd ** -0.5
    got = pa.prefill_attention(q, pool.k, pool.v, table_t, dev[0], dev[1], dev[2],
                               max(n for n, _ in chunks), scale)
    for i, (n, c) in enumerate(chunks):
        rows = slice(starts[i], starts[i] + n)
        # the reference reads the chunk's own K/V from the cache too when there is a prefix; else from k, v
        own = torch.tensor([tables[i][j // BS] * BS + j % BS for j in range(c, c + n)], device=DEVICE)
        k_own = pool.k.view(-1, kvh, hd)[own]
        v_own = pool.v.view(-1, kvh, hd)[own]
        want = ref.prefill_attention(q[rows], k_own, v_own, pool.k, pool.v, table_t[i], c, scale)
        rel = _rel(got[rows], want)
        assert rel < TOL, f"chunk {i} ({n} after {c}), group {group}: rel error {rel:.3g}"


def test_store_kv_writes_slots_and_skips_negative_ones() -> None:
    pa = _kernels()
    kc = torch.zeros(8, BS, 2, 64, device=DEVICE, dtype=DTYPE)
    vc = torch.zeros_like(kc)
    kv = torch.randn(5, 2, 2, 64, device=DEVICE).to(DTYPE)  # a strided view, as the model's k and v are
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([3, 17, -1, 127, 40], device=DEVICE)
    pa.store_kv(kc, vc, k, v, slots)
    flat_k, flat_v = kc.view(-1, 2, 64), vc.view(-1, 2, 64)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[i]) and torch.equal(flat_v[s], v[i])
    assert int((flat_k != 0).any(dim=(1, 2)).sum()) == 4


@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_step_matches_reference_step(group: int) -> None:
    """The whole step (store, decodes, prefill chunks) through both backends from the same cache."""
    pa = _kernels()
    rng = random.Random(7 + group)
    kvh, hd = (2 if group < 8 else 1), 128
    heads = kvh * group
    decodes = [rng.randint(1, 500) for _ in range(5)]  # context before this step
    chunks = [(rng.randint(1, 100), rng.randint(0, 200)) for _ in range(3)]
    pool = Pool(200, kvh, hd, rng)
    lens = [c + 1 for c in decodes] + [n + c for n, c in chunks]
    tables = [pool.sequence(n) for n in lens]
    qlens = [1] * len(decodes) + [n for n, _ in chunks]
    ctx = decodes + [c for _, c in chunks]
    slots = [tables[i][j // BS] * BS + j % BS for i in range(len(lens)) for j in range(ctx[i], lens[i])]
    t = len(slots)
    q = torch.randn(t, heads, hd, device=DEVICE).to(DTYPE)
    k = torch.randn(t, kvh, hd, device=DEVICE).to(DTYPE)
    v = torch.randn(t, kvh, hd, device=DEVICE).to(DTYPE)

    def meta() -> AttentionMetadata:
        return AttentionMetadata(block_size=BS, num_decodes=len(decodes), query_lens=qlens, context_lens=ctx,
                                 slot_mapping=torch.tensor(slots, device=DEVICE),
                                 block_tables=_tables(tables),
                                 decode_seq_lens=torch.tensor(lens[:len(decodes)], device=DEVICE))

    kc2, vc2 = pool.k.clone(), pool.v.clone()
    want = ref.paged_attention(q, k, v, pool.k, pool.v, meta(), hd ** -0.5)
    got = pa.paged_attention(q, k, v, kc2, vc2, meta(), hd ** -0.5)
    assert torch.equal(kc2, pool.k) and torch.equal(vc2, pool.v)
    assert _rel(got, want) < TOL
    for i in range(len(lens)):  # per sequence, not only in aggregate
        rows = slice(sum(qlens[:i]), sum(qlens[:i + 1]))
        assert _rel(got[rows], want[rows]) < TOL, f"sequence {i}"
