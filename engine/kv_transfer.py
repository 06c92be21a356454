"""KV hand-off between engine workers (split-pool mode): one worker reads another's cache blocks directly.

Each worker exports its paged KV cache once, as a small picklable :class:`KVHandle` (sent to the front-end
in ``WorkerReady``); a decode worker that continues a request opens the prefill worker's handle and copies
the request's blocks straight into its own cache, one copy, no staging buffer:

- CPU workers: the cache tensor lives in a named POSIX shared-memory segment
  (:func:`share_cpu_cache`); the peer maps it and copies with ``index_select``/``index_copy_``.
- GPU workers: CUDA IPC (``torch.multiprocessing.reductions.reduce_tensor``: the cache's allocation is
  opened in the peer process) and a device-to-device peer copy (NVLink or PCIe P2P, no host bounce).
  The NCCL send/recv alternative of the issue is not built: IPC needs no collective set-up per pair and
  no matching call on the sending side, which stays busy with the next prompt.

Only the blocks the decode side does not already hold in its prefix cache are copied; the caller (the
engine) decides which (:meth:`LLMEngine.add_transferred`). Each pull is timed (device synchronized before
both clock reads) and its bytes counted: :class:`TransferResult`.

The cache layout is the worker's: ``(layers, 2, blocks, block_size, kv_heads, head_dim)``; a block is
``kv[:, :, b]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
import torch

from phaselens.engine.protocol import KVHandle

log = logging.getLogger(__name__)

BLOCK_DIM = 2  # the cache tensor's block dimension (also in protocol.KVHandle)


@dataclass(frozen=True)
class TransferResult:
    """One request's hand-off as the receiving worker measured it."""

    blocks_moved: int
    blocks_cached: int
    bytes: int
    seconds: float


class KVTransferError(RuntimeError):
    """A peer's cache could not be opened or does not match this worker's."""


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KVTransferError(f"unknown dtype {name!r} in a KV handle")
    return dt


def share_cpu_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, shared_memory.SharedMemory]:
    """A copy of a CPU cache tensor placed in a new named shared-memory segment, and the segment.

    The caller swaps the returned tensor in for the original (same shape, dtype and contents) and keeps
    the segment alive as long as the tensor.
    """
    if kv_cache.device.type != "cpu":
        raise ValueError(f"share_cpu_cache: cache is on {kv_cache.device}, not the CPU")
    nbytes = kv_cache.numel() * kv_cache.element_size()
    shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
    shared = torch.frombuffer(shm.buf, dtype=kv_cache.dtype, count=kv_cache.numel()).view(kv_cache.shape)
    shared.copy_(kv_cache)
    return shared, shm


class KVTransfer:
    """One worker's end of the hand-off: exports its own cache, opens peers' caches and pulls blocks."""

    def __init__(self, worker_id: str, kv_cache: torch.Tensor, shm: shared_memory.SharedMemory | None = None):
        self.worker_id = worker_id
        self.kv_cache = kv_cache
        self._shm = shm
        #: worker id -> (the handle it was opened from, the mapped tensor, the segment for CPU peers)
        self._peers: dict[str, tuple[KVHandle, torch.Tensor, shared_memory.SharedMemory | None]] = {}

    # -- export

    @property
    def shared(self) -> bool:
        """Whether peers can open this cache (CUDA caches always; CPU ones once in shared memory)."""
        return self.kv_cache.device.type == "cuda" or self._shm is not None

    def share_cpu(self) -> torch.Tensor:
        """Move this CPU cache into shared memory; returns the new tensor, which the caller swaps in."""
        if self._shm is None:
            self.kv_cache, self._shm = share_cpu_cache(self.kv_cache)
        return self.kv_cache

    def handle(self) -> KVHandle:
        kv = self.kv_cache
        common = dict(worker_id=self.worker_id, shape=tuple(kv.shape), dtype=str(kv.dtype),
                      device=str(kv.device), itemsize=kv.element_size())
        if kv.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            return KVHandle(kind="cuda_ipc", ipc=reduce_tensor(kv), **common)
        if self._shm is None:
            raise KVTransferError("this CPU cache is not in shared memory (share_cpu_cache)")
        return KVHandle(kind="shm", shm_name=self._shm.name, **common)

    # -- import

    def open_peer(self, handle: KVHandle) -> torch.Tensor:
        """Map a peer's cache (once per peer and handle); KVTransferError if it cannot be or does not fit."""
        have = self._peers.get(handle.worker_id)
        if have is not None and have[0] == handle:
            return have[1]
        if have is not None:  # the peer restarted with a new cache: drop the old mapping
            self._close_peer(handle.worker_id)
        own = self.kv_cache
        theirs = handle.shape[:BLOCK_DIM] + handle.shape[BLOCK_DIM + 1:]
        mine = tuple(own.shape[:BLOCK_DIM]) + tuple(own.shape[BLOCK_DIM + 1:])
        if theirs != mine or _dtype(handle.dtype) != own.dtype:
            raise KVTransferError(f"worker {handle.worker_id}'s KV cache {handle.shape} {handle.dtype} "
                                  f"does not match this worker's {tuple(own.shape)} {own.dtype} (other model "
                                  "or block size)")
        shm = None
        try:
            if handle.kind == "shm":
                if own.device.type != "cpu":
                    raise KVTransferError(f"a CPU peer ({handle.worker_id}) cannot feed a {own.device} cache")
                shm = shared_memory.SharedMemory(name=handle.shm_name)
                numel = 1
                for n in handle.shape:
                    numel *= n
                peer = torch.frombuffer(shm.buf, dtype=own.dtype, count=numel).view(handle.shape)
            elif handle.kind == "cuda_ipc":
                rebuild, args = handle.ipc
                peer = rebuild(*args)
                _enable_peer_access(peer.device, own.device)
            else:
                raise KVTransferError(f"unknown KV handle kind {handle.kind!r}")
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, KVTransferError):
                raise
            raise KVTransferError(f"cannot open worker {handle.worker_id}'s KV cache ({handle.kind}): "
                                  f"{exc}") from exc
        self._peers[handle.worker_id] = (handle, peer, shm)
        return peer

    def pull(self, handle: KVHandle, src_blocks: list[int], dst_blocks: list[int],
             blocks_cached: int = 0) -> TransferResult:
        """Copy the peer's ``src_blocks`` into this cache's ``dst_blocks`` (same order); timed."""
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
        peer = self.open_peer(handle)
        bad = [b for b in src_blocks if not 0 <= b < handle.num_blocks]
        if bad:
            raise KVTransferError(f"block {bad[0]} is outside worker {handle.worker_id}'s cache")
        own = self.kv_cache
        nbytes = len(src_blocks) * handle.block_bytes
        cuda = own.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(own.device)
        t0 = time.perf_counter()
        if src_blocks:
            src_idx = torch.tensor(src_blocks, dtype=torch.int64, device=peer.device)
            dst_idx = torch.tensor(dst_blocks, dtype=torch.int64, device=own.device)
            # gather on the source device, one peer copy of the packed blocks, scatter on this one
            staged = peer.index_select(BLOCK_DIM, src_idx)
            own.index_copy_(BLOCK_DIM, dst_idx, staged.to(own.device, non_blocking=cuda))
            del staged
        if cuda:
            torch.cuda.synchronize(own.device)
            if peer.device != own.device:
                torch.cuda.synchronize(peer.device)
        seconds = time.perf_counter() - t0
        return TransferResult(blocks_moved=len(src_blocks), blocks_cached=blocks_cached, bytes=nbytes,
                              seconds=seconds)

    # -- teardown

    def _close_peer(self, worker_id: str) -> None:
        _, tensor, shm = self._peers.pop(worker_id)
        del tensor
        if shm is not None:
            try:
                shm.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with the process
                log.debug("peer %s: shared memory still referenced at close", worker_id)

    def close(self) -> None:
        """Unmap peers, and remove this worker's own segment (only the creator unlinks it)."""
        for wid in list(self._peers):
            self._close_peer(wid)
        if self._shm is not None:
            shm, self._shm = self._shm, None
            self.kv_cache = None  # type: ignore[assignment]
            try:
                shm.close()
            except BufferError:
                log.debug("own KV segment still referenced at close; unlinking anyway")
            try:
                shm.unlink()
            except FileNotFoundError:  # removed by someone else already: nothing left to free
                log.warning("KV segment %s was already removed", shm.name)


def _enable_peer_access(src: torch.device, dst: torch.device) -> None:
    """Make sure a copy between two GPUs goes peer to peer; warn once if the pair cannot."""
    if src == dst or src.type != "cuda" or dst.type != "cuda":
        return
    if not torch.cuda.can_device_access_peer(dst.index or 0, src.index or 0):
        log.warning("GPU %s cannot access GPU %s directly: KV copies go through the host", dst, src)
