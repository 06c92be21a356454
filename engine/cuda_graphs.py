"""CUDA graphs of the decode forward at a set of batch sizes.

An 8B decode step in eager mode launches about 600 kernels; on the H100 the host took 16-32 ms to launch
what the GPU ran in 8 ms (bench/RESULTS.md, 2026-11-23 03:10). A graph replays the whole forward (embedding,
every layer, the final norm) in one launch. Graphs are captured once per batch size in
:data:`CAPTURE_SIZES` up to ``max_num_seqs``; a step of ``B`` decodes replays the smallest captured size
``>= B`` with the rows past ``B`` padded: their cache slot is -1 (the KV store skips it) and their sequence
length 0 (attention writes a zero row), so a padded row touches no sequence's cache. The LM head and the
sampler run after the replay, on the real rows only (each request samples under its own parameters).

Inputs live in static buffers the graphs were captured on; :meth:`DecodeGraphs.run` copies a step's
tensors into them on the device (no host synchronization). Block tables are copied into the top-left
corner of a ``[max batch, max blocks]`` buffer: the kernel reads only the blocks below each sequence's
length, so the stale entries to the right are never read. Only the Triton attention can be captured: the
torch reference sizes its gather from host integers that a graph would freeze.
"""

from __future__ import annotations

import logging
import time

import torch

from phaselens.engine.model import LlamaModel
from phaselens.kernels import AttentionMetadata

log = logging.getLogger(__name__)

#: batch sizes captured (those up to ``max_num_seqs``, and ``max_num_seqs`` itself): powers of two at the
#: small end, where one padded row is a large share, steps of 16 and 32 above (vLLM's capture list is
#: similar: 1, 2, 4, then multiples of 8)
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``kv_cache``, one per batch size."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, max_batch: int,
                 max_blocks: int) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {model.device}")
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch} | {max_batch})
        self.max_batch, self.max_blocks = max_batch, max_blocks
        dev = model.device
        # token ids, positions, cache slots and sequence lengths: one block, filled by one copy per step
        self.block = torch.zeros(4, max_batch, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slots, self.seq_lens = self.block.unbind(0)
        self.slots.fill_(-1)
        #: what padded rows get for (slot, sequence length): skipped by the KV store, attend to nothing
        self.pad = torch.tensor([[-1], [0]], dtype=torch.int64, device=dev).repeat(1, max_batch)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        #: replays so far (tests and benchmarks check that steps really ran as graphs)
        self.num_replays = 0

    def _meta(self, batch: int) -> AttentionMetadata:
        from phaselens.kernels.paged_attention import decode_splits

        return AttentionMetadata(block_size=self.block_size, num_decodes=batch, query_lens=[1] * batch,
                                 context_lens=[0] * batch, slot_mapping=self.slots[:batch],
                                 block_tables=self.tables[:batch], decode_seq_lens=self.seq_lens[:batch],
                                 decode_splits=decode_splits(batch, self.model.config.num_kv_heads))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (the smaller ones reuse its memory pool). All rows are padding
        while capturing, so no cache block is written."""
        t0 = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        for batch in reversed(self.sizes):
            meta = self._meta(batch)
            args = (self.input_ids[:batch], self.positions[:batch], meta, self.kv_cache)
            with torch.cuda.stream(stream):  # compile the kernels and warm cuBLAS outside the capture
                self.model(*args)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[batch] = self.model(*args)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        torch.cuda.synchronize(self.model.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.2f s", self.sizes,
                 time.perf_counter() - t0)

    def padded_size(self, batch: int) -> int | None:
        """The captured size a step of ``batch`` decodes replays, or None when it is larger than all."""
        return next((s for s in self.sizes if s >= batch), None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            block: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` of a decode-only step (``meta.num_decodes == B``), by replay.

        ``block``: the step's ``[4, B]`` ids, positions, slots and sequence lengths in one tensor, when the
        runner packed them so (one copy instead of four)."""
        batch = input_ids.shape[0]
        size = self.padded_size(batch)
        if size is None or meta.num_decodes != batch or meta.decode_seq_lens is None:
            raise ValueError(f"no decode graph for a step of {batch} tokens ({meta.num_decodes} decodes)")
        width = meta.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"block tables of {width} blocks exceed the captured {self.max_blocks}")
        if block is not None:
            self.block[:, :batch].copy_(block)
        else:
            self.input_ids[:batch].copy_(input_ids)
            self.positions[:batch].copy_(positions)
            self.slots[:batch].copy_(meta.slot_mapping)
            self.seq_lens[:batch].copy_(meta.decode_seq_lens)
        self.tables[:batch, :width].copy_(meta.block_tables)
        if size > batch:
            self.block[2:, batch:size].copy_(self.pad[:, :size - batch])
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:batch]
