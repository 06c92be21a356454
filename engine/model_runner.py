"""Packs one step's tokens, runs the model over the paged cache and samples.

The host builds a handful of per-sequence integers and the flat token list, copies them to the device in
one transfer, and the device derives positions and cache slots itself: no host loop over tokens. The
sampled ids stay on the device; the engine reads them back once per step (the only host synchronization).
On CUDA, decode-only steps replay a captured CUDA graph of the forward (engine/cuda_graphs.py) once
:meth:`ModelRunner.capture_decode_graphs` has run; other steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phaselens.engine.cuda_graphs import DecodeGraphs
from phaselens.engine.model import LlamaModel
from phaselens.engine.sampler import Sampler
from phaselens.engine.scheduler import SchedulerOutput
from phaselens.engine.sequence import Sequence
from phaselens.kernels import AttentionMetadata


@dataclass
class StepInputs:
    """Device tensors of one step, ready for :meth:`ModelRunner.run`."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    #: row of each sampled sequence's last token in the packed step
    sample_rows: torch.Tensor
    sample_index: list[int]  # index into the step's scheduled list
    #: decode-only steps: ``[4, B]`` device rows (token ids, positions, cache slots, sequence lengths), the
    #: block a CUDA graph's static inputs take in one copy
    decode_block: torch.Tensor | None = None


class _HostBlockTables:
    """The block tables of the sequences in the last step, kept in a host array from step to step.

    Converting every table from Python ints each step cost about 300 us of a batch-64 decode step with
    1k-token contexts on the CPU (bench/host_overhead.py), though a table changes once in ``block_size``
    steps. A sequence's table only grows until the block manager replaces the list (preemption, the end of
    the request; :class:`~phaselens.engine.sequence.Sequence`), so each sequence keeps a row of
    :attr:`rows`, and a step writes only the entries appended since the last one; a new list is written
    whole. Entries past a table's end are 0 (the padding the attention masks out). A sequence missing from
    a step gives its row back.
    """

    def __init__(self) -> None:
        self.rows = np.zeros((8, 64), dtype=np.int64)
        #: sequence -> [row, the table list written, entries written]
        self._of: dict[Sequence, list[Any]] = {}
        self._free = list(range(len(self.rows) - 1, -1, -1))

    def rows_for(self, seqs: list[Sequence]) -> tuple[np.ndarray, int]:
        """Bring the rows of ``seqs`` up to date; their row numbers, and the longest table's length."""
        of, rows = self._of, self.rows
        if len(of) > len(seqs):  # someone left: free the rows of sequences not in this step
            here = set(seqs)
            for gone in [q for q in of if q not in here]:
                row, _, n = of.pop(gone)
                rows[row, :n] = 0
                self._free.append(row)
        idx = []
        width = 0
        for q in seqs:
            table = q.block_table
            m = len(table)
            if m > width:
                width = m
            e = of.get(q)
            if e is None:
                if not self._free:
                    self._grow(2 * len(self.rows), self.rows.shape[1])
                e = of[q] = [self._free.pop(), table, 0]
            row, written, n = e
            if written is not table or m < n:  # a new list: write it whole
                self.rows[row, :n] = 0
                e[1] = table
                n = 0
            if m != n:
                if m > self.rows.shape[1]:
                    self._grow(len(self.rows), max(m, 2 * self.rows.shape[1]))
                self.rows[row, n:m] = table[n:m]
                e[2] = m
            idx.append(row)
        return np.array(idx, dtype=np.int64), width

    def gather(self, rows: np.ndarray, width: int, out: np.ndarray) -> None:
        """``out[i] = rows_array[rows[i], :width]`` (``out``: ``[len(rows), width]``)."""
        np.take(self.rows[:, :width], rows, axis=0, out=out, mode="clip")

    def _grow(self, n_rows: int, n_cols: int) -> None:
        grown = np.zeros((n_rows, n_cols), dtype=np.int64)
        old = self.rows
        grown[:len(old), :old.shape[1]] = old
        self._free.extend(range(n_rows - 1, len(old) - 1, -1))
        self.rows = grown


class ModelRunner:
    """Runs the model for a scheduled step over a KV cache it is given."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = model.device
        self.sampler = Sampler()
        self._pin = self.device.type == "cuda"
        self._tables = _HostBlockTables()
        self.graphs: DecodeGraphs | None = None
        #: replay decode graphs when captured (False: every step eager, for A/B comparisons)
        self.use_cuda_graphs = True

    def capture_decode_graphs(self, max_batch: int, max_blocks: int) -> None:
        """Capture decode graphs for batches up to ``max_batch`` and block tables up to ``max_blocks``."""
        graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_batch, max_blocks)
        graphs.capture()
        self.graphs = graphs

    def replays(self, out: SchedulerOutput) -> bool:
        """Whether this step runs as a graph replay (decode-only, and a captured size holds it)."""
        g = self.graphs
        return (g is not None and self.use_cuda_graphs and out.num_decodes == len(out.scheduled) > 0
                and g.padded_size(len(out.scheduled)) is not None)

    def _host(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """A fresh int64 host buffer of ``n`` (pinned on CUDA) and its numpy view, filled by the caller.

        Fresh each step, so a copy still in flight never sees the next step's values (the caching host
        allocator reuses a pinned block only once the copies that read it are done); filled through numpy,
        which converts Python ints about 4x faster than ``torch.tensor`` of a list.
        """
        host = torch.empty(n, dtype=torch.int64, pin_memory=self._pin)
        return host, host.numpy()

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True) if self._pin else host.to(self.device)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Pack the step (host work, then one host-to-device copy)."""
        sched = out.scheduled
        num_seqs = len(sched)
        if num_seqs and out.num_decodes == num_seqs:
            return self._prepare_decode(out)
        qlens = [s.num_tokens for s in sched]
        ctx = [s.context_len for s in sched]
        tokens: list[int] = []
        sample_index: list[int] = []
        sample_rows: list[int] = []
        for i, s in enumerate(sched):
            c, n = s.context_len, s.num_tokens
            tokens += s.seq.token_ids[c:c + n]
            if s.samples:
                sample_index.append(i)
                sample_rows.append(len(tokens) - 1)
        rows, width = self._tables.rows_for([s.seq for s in sched])
        n_tok, n_samp = len(tokens), len(sample_rows)
        host, h = self._host(n_tok + 2 * num_seqs + n_samp + num_seqs * width)
        h[:n_tok] = tokens
        o = n_tok
        h[o:o + num_seqs] = qlens
        h[o + num_seqs:o + 2 * num_seqs] = ctx
        o += 2 * num_seqs
        h[o:o + n_samp] = sample_rows
        o += n_samp
        self._tables.gather(rows, width, h[o:].reshape(num_seqs, width))
        dev = self._to_device(host)
        input_ids, qlen_t, ctx_t, rows_t, table_t = dev.split(
            [n_tok, num_seqs, num_seqs, n_samp, num_seqs * width])
        block_tables = table_t.view(num_seqs, width)
        # positions and slots derived on the device from the per-sequence numbers
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=self.device), qlen_t,
                                               output_size=n_tok)
        starts = torch.cumsum(qlen_t, 0) - qlen_t
        positions = torch.arange(n_tok, device=self.device) - starts[seq_of_token] + ctx_t[seq_of_token]
        bs = self.block_size
        slots = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        nd = out.num_decodes
        meta = AttentionMetadata(block_size=bs, num_decodes=nd, query_lens=qlens, context_lens=ctx,
                                 slot_mapping=slots, block_tables=block_tables,
                                 decode_seq_lens=ctx_t[:nd] + 1 if nd else None,
                                 query_starts_dev=starts, query_lens_dev=qlen_t, context_lens_dev=ctx_t)
        return StepInputs(input_ids, positions, meta, rows_t, sample_index)

    def _prepare_decode(self, out: SchedulerOutput) -> StepInputs:
        """A decode-only step: one token per sequence, so positions and slots are a host integer each; no
        device kernels to derive them (the step is a graph replay, launch count matters)."""
        sched = out.scheduled
        b, bs = len(sched), self.block_size
        seqs = [s.seq for s in sched]
        pos = [s.context_len for s in sched]
        ids = [q.token_ids[c] for q, c in zip(seqs, pos)]
        sample_index = [i for i, s in enumerate(sched) if s.samples]
        # cache slot of each new token: its block * block_size + its offset in the block
        slots = [q.block_table[c // bs] * bs + c % bs for q, c in zip(seqs, pos)]
        rows, width = self._tables.rows_for(seqs)
        n_samp = len(sample_index)
        host, h = self._host(4 * b + n_samp + b * width)
        h[:4 * b + n_samp] = ids + pos + slots + [c + 1 for c in pos] + sample_index
        self._tables.gather(rows, width, h[4 * b + n_samp:].reshape(b, width))
        dev = self._to_device(host)
        block = dev[:4 * b].view(4, b)
        rows_t = dev[4 * b:4 * b + n_samp]
        block_tables = dev[4 * b + n_samp:].view(b, width)
        meta = AttentionMetadata(block_size=bs, num_decodes=b, query_lens=[1] * b, context_lens=pos,
                                 slot_mapping=block[2], block_tables=block_tables, decode_seq_lens=block[3])
        return StepInputs(block[0], block[1], meta, rows_t, sample_index, decode_block=block)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, inputs: StepInputs) -> torch.Tensor:
        """Model forward and sampling; returns the sampled ids on the device (not read back)."""
        if self.replays(out):
            assert self.graphs is not None
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inputs.decode_block)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        if not inputs.sample_index:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        seqs = [out.scheduled[i].seq for i in inputs.sample_index]
        return self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
