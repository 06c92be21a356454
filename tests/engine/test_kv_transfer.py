"""kv_transfer: one worker's cache read by another through its handle, block for block."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from phaselens.engine.kv_transfer import KVTransfer, KVTransferError, share_cpu_cache

SHAPE = (2, 2, 8, 4, 2, 3)  # layers, K/V, blocks, block size, kv heads, head dim


def _pair() -> tuple[KVTransfer, KVTransfer]:
    src, shm = share_cpu_cache(torch.randn(SHAPE))
    dst, shm2 = share_cpu_cache(torch.zeros(SHAPE))
    return KVTransfer("src", src, shm), KVTransfer("dst", dst, shm2)


def test_pull_copies_exactly_the_named_blocks_and_counts_them() -> None:
    a, b = _pair()
    try:
        h = a.handle()
        assert h.kind == "shm" and h.num_blocks == 8 and h.block_bytes == 2 * 2 * 4 * 2 * 3 * 4
        res = b.pull(h, [5, 1, 6], [0, 3, 7], blocks_cached=2)
        assert (res.blocks_moved, res.blocks_cached, res.bytes) == (3, 2, 3 * h.block_bytes)
        assert res.seconds >= 0
        for s, d in ((5, 0), (1, 3), (6, 7)):
            assert torch.equal(b.kv_cache[:, :, d], a.kv_cache[:, :, s])
        untouched = [i for i in range(8) if i not in (0, 3, 7)]
        assert not b.kv_cache[:, :, untouched].any(), "no other block written"
        assert b.pull(h, [], []).bytes == 0
    finally:
        a.close()
        b.close()


def test_bad_handles_and_blocks_are_refused_with_a_reason() -> None:
    a, b = _pair()
    other, shm = share_cpu_cache(torch.zeros(2, 2, 8, 8, 2, 3))  # another block size
    c = KVTransfer("c", other, shm)
    try:
        with pytest.raises(KVTransferError, match="does not match"):
            b.pull(c.handle(), [0], [0])
        with pytest.raises(KVTransferError, match="block 9 is outside"):
            b.pull(a.handle(), [9], [0])
        with pytest.raises(ValueError, match="2 source blocks for 1"):
            b.pull(a.handle(), [0, 1], [0])
        with pytest.raises(KVTransferError, match="not in shared memory"):
            KVTransfer("x", torch.zeros(SHAPE)).handle()
    finally:
        for t in (a, b, c):
            t.close()


def _child_pull(handle, out) -> None:
    dst, shm = share_cpu_cache(torch.zeros(SHAPE))
    t = KVTransfer("child", dst, shm)
    t.pull(handle, [2, 4], [0, 1])
    out.put(dst[:, :, :2].tolist())  # plain lists: a shared tensor would die with this process
    t.close()


def test_a_worker_in_another_process_reads_the_cache() -> None:
    a, _ = _pair()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_child_pull, args=(a.handle(), out))
    p.start()
    try:
        got = out.get(timeout=60)
        assert torch.equal(torch.tensor(got), a.kv_cache[:, :, [2, 4]])
    finally:
        p.join(30)
        a.close()
    assert p.exitcode == 0


def _gpu_child(handle, out) -> None:
    dev = torch.device("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0")
    dst = torch.zeros(SHAPE, device=dev)
    t = KVTransfer("child", dst)
    res = t.pull(handle, [3, 7], [1, 2])
    out.put((dst[:, :, [1, 2]].cpu().tolist(), res.bytes))


@pytest.mark.gpu
def test_cuda_ipc_peer_copy_between_processes() -> None:
    src = torch.randn(SHAPE, device="cuda:0")
    a = KVTransfer("src", src)
    h = a.handle()
    assert h.kind == "cuda_ipc"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_gpu_child, args=(h, out))
    p.start()
    got, nbytes = out.get(timeout=120)
    p.join(60)
    assert torch.equal(torch.tensor(got), src[:, :, [3, 7]].cpu()) and nbytes == 2 * h.block_bytes
