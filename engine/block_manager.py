"""The paged KV cache's bookkeeping: fixed-size blocks, block tables, reference counts, prefix caching.

A sequence's keys and values live in blocks of ``block_size`` tokens named by its block table (vLLM's
PagedAttention, Kwon et al. 2023). A full block is registered under a hash chained over all tokens up to
and including it, so a later request with the same prefix reuses the block instead of recomputing it.
Blocks nobody references go to a free list in the order they were freed; allocation takes the oldest
(least recently used) first, evicting its cached content only then, so freed prefixes stay reusable as long
as possible.
"""

from __future__ import annotations

from collections import OrderedDict

from phaselens.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Chained hash of a full block: depends on every token before it too."""
    return hash((parent, tokens))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Allocates KV blocks to sequences and shares full blocks through the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        #: unreferenced blocks, least recently freed first (insertion order of the dict)
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    # -- queries

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by some sequence (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``'s tokens, in full blocks.

        At least one token is left out, so that the step computes the logits of the last one.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            parent = h
        return hits

    # -- changes

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens, after the ``cached`` prefix blocks.

        ``cached`` (from :meth:`cached_prefix`) is for a sequence without blocks; its blocks join the
        table and count as computed. Returns False, changing nothing, when too few blocks are free.
        """
        cached = cached or []
        if cached and seq.block_table:
            raise ValueError(f"{seq.request_id}: prefix blocks given to a sequence that has blocks")
        computed = len(cached) * self.block_size if cached else seq.num_computed_tokens
        have = len(cached) + len(seq.block_table)
        new = max(0, self.blocks_needed(computed + num_new_tokens) - have)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if new + revived > len(self.free):
            return False
        for bid in cached:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)
        if cached:
            seq.num_computed_tokens = computed
        for _ in range(new):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:
                if self.hash_to_block.get(block.hash) == bid:
                    del self.hash_to_block[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(bid)
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put the sequence's newly completed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            # an equal block cached earlier stays the one found; this one is just not shared
            self.hash_to_block.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def free_seq(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody holds join the free list, its last blocks first
        (so they are evicted before its first ones, which other prompts are likelier to share)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {bid} freed more often than allocated")
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_invariants(self) -> None:
        """Consistency of the free list, reference counts and the hash index (for tests)."""
        for block in self.blocks:
            if (block.ref_count == 0) != (block.block_id in self.free):
                raise AssertionError(f"block {block.block_id}: ref {block.ref_count}, free-listed "
                                     f"{block.block_id in self.free}")
        for h, bid in self.hash_to_block.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"hash index points at block {bid}, which holds another hash")
