"""Packs one step's tokens, runs the model over the paged cache and samples.

The host builds a handful of per-sequence integers and the flat token list, copies them to the device in
one transfer, and the device derives positions and cache slots itself: no host loop over tokens. The
sampled ids stay on the device; the engine reads them back once per step (the only host synchronization).
On CUDA, decode-only steps replay a captured CUDA graph of the forward (engine/cuda_graphs.py) once
:meth:`ModelRunner.capture_decode_graphs` has run; other steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phaselens.engine.cuda_graphs import DecodeGraphs
from phaselens.engine.model import LlamaModel
from phaselens.engine.sampler import Sampler
from phaselens.engine.scheduler import SchedulerOutput
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


class ModelRunner:
    """Runs the model for a scheduled step over a KV cache it is given."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = model.device
        self.sampler = Sampler()
        self._pin = self.device.type == "cuda"
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

    def _to_device(self, flat: list[int]) -> torch.Tensor:
        host = torch.tensor(flat, dtype=torch.int64)
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Pack the step (host work, then one host-to-device copy)."""
        sched = out.scheduled
        num_seqs = len(sched)
        if num_seqs and out.num_decodes == num_seqs:
            return self._prepare_decode(out)
        qlens = [s.num_tokens for s in sched]
        ctx = [s.context_len for s in sched]
        tables = [s.seq.block_table for s in sched]
        width = max(len(t) for t in tables)
        tokens: list[int] = []
        for s in sched:
            tokens += s.seq.token_ids[s.context_len:s.context_len + s.num_tokens]
        sample_index = [i for i, s in enumerate(sched) if s.samples]
        cu = [0]
        for q in qlens:
            cu.append(cu[-1] + q)
        sample_rows = [cu[i + 1] - 1 for i in sample_index]
        flat: list[int] = tokens + qlens + ctx + sample_rows
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        dev = self._to_device(flat)
        n_tok, n_samp = len(tokens), len(sample_rows)
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
        ids, pos, slots, lens = [], [], [], []
        for s in sched:
            c, table = s.context_len, s.seq.block_table
            ids.append(s.seq.token_ids[c])
            pos.append(c)
            slots.append(table[c // bs] * bs + c % bs)
            lens.append(c + 1)
        sample_index = [i for i, s in enumerate(sched) if s.samples]
        width = max(len(s.seq.block_table) for s in sched)
        flat = ids + pos + slots + lens + sample_index
        for s in sched:
            flat += s.seq.block_table
            flat += [0] * (width - len(s.seq.block_table))
        dev = self._to_device(flat)
        block = dev[:4 * b].view(4, b)
        rows_t = dev[4 * b:4 * b + len(sample_index)]
        block_tables = dev[4 * b + len(sample_index):].view(b, width)
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
