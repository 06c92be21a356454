"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute.

Each step fills a budget of ``max_num_batched_tokens`` in this order (vLLM's chunked-prefill policy):

1. decodes of running sequences (one token each), so generation never stalls behind long prompts;
2. prefills already under way, continued in chunks;
3. new prefills from the waiting queue, first come first served, while sequences and blocks last.

When the KV cache runs out, the most recently admitted running sequence not yet in this step is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed (prompt and
outputs so far) when admitted again. The step is classified :class:`~phaselens.phase.Phase` ``PREFILL``,
``DECODE`` or ``MIXED`` from what it carries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from phaselens.engine.block_manager import BlockManager
from phaselens.engine.sequence import Sequence, SequenceStatus
from phaselens.phase import Phase


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: ``num_tokens`` tokens after ``context_len`` cached ones."""

    seq: Sequence
    num_tokens: int
    context_len: int
    is_prefill: bool

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's tokens, so it samples the next one."""
        return self.context_len + self.num_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    """What one step runs: decodes first, then prefill chunks."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    #: (len(scheduled), tokens, decodes) when last counted: a step asks for its counts several times, and
    #: ``scheduled`` is only ever appended to, so its length says whether they are still right
    _counts: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False, compare=False)

    def _count(self) -> tuple[int, int, int]:
        sched = self.scheduled
        if self._counts[0] != len(sched):
            self._counts = (len(sched), sum(s.num_tokens for s in sched),
                            sum(1 for s in sched if not s.is_prefill))
        return self._counts

    @property
    def num_tokens(self) -> int:
        return self._count()[1]

    @property
    def num_decodes(self) -> int:
        return self._count()[2]

    @property
    def phase(self) -> Phase | None:
        """None for an empty step."""
        n, _, decodes = self._count()
        if n == 0:
            return None
        if decodes == n:
            return Phase.DECODE
        return Phase.MIXED if decodes else Phase.PREFILL

    def prefill_seqs(self) -> list[tuple[int, int, bool]]:
        """``(chunk_len, cached_ctx_before, samples)`` of each prefill chunk (the shim's ``prefill_seqs``)."""
        return [(s.num_tokens, s.context_len, s.samples) for s in self.scheduled if s.is_prefill]

    def decode_ctx(self) -> list[int]:
        """Context before the step of each decode (the shim's ``decode_ctx``)."""
        return [s.context_len for s in self.scheduled if not s.is_prefill]


class Scheduler:
    """Decides, step by step, which sequences run and how many of their tokens."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: earlier ones have priority
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED

    def park(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch but keep its blocks (its KV is being handed off)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PARKED

    def attach(self, seq: Sequence) -> None:
        """Put a sequence whose blocks are already filled (parked, or copied from a peer) into the batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    # -- the step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        in_step: set[Sequence] = set()
        scheduled = out.scheduled

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens, seq.is_prefilling))
            in_step.add(seq)
            budget -= n

        def make_room(seq: Sequence, n: int) -> bool:
            """Allocate for ``seq``, preempting later sequences not in this step; False if ``seq`` went."""
            while not self.block_manager.allocate(seq, n):
                victim = next((s for s in reversed(self.running) if s not in in_step and s is not seq), None)
                self._preempt(victim or seq, out)
                if victim is None:
                    return False
            return True

        # 1. decodes; the prefills under way are noted, in order, for 2.
        bs = self.block_manager.block_size
        under_way: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.is_prefilling:
                under_way.append(seq)
            # the next token's slot is in the last block (15 steps of 16 at block size 16): no allocation
            elif seq.num_computed_tokens < len(seq.block_table) * bs or make_room(seq, 1):
                take(seq, 1)
        # 2. prefills under way
        for seq in under_way:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for a decode in 1.
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if make_room(seq, n):
                take(seq, n)
        # 3. new prefills; none in a step that had to preempt (the cache is full: admitting would thrash)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cached = self.block_manager.cached_prefix(seq)
            n = min(len(seq) - len(cached) * bs, budget)
            if not self.block_manager.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.prefill_target = len(seq)
            self.running.append(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(cached) * bs
                self.prefix_hit_tokens += seq.num_cached_tokens
                self.prefix_query_tokens += len(seq)
            take(seq, n)
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens are in the cache; register completed blocks."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted since it was scheduled
                continue
            seq.num_computed_tokens += s.num_tokens
            self.block_manager.register_full_blocks(seq)  # nothing to do unless a block filled
