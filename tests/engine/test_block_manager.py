"""Block manager: allocation, reference counts, prefix caching by chained hash, LRU eviction."""

from __future__ import annotations

import pytest

from phaselens.engine.block_manager import BlockManager
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.sequence import Sequence


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), 0)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What a step does: allocate, 'run', then count the tokens as cached and register full blocks."""
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.register_full_blocks(s)


def test_allocate_and_free_leave_nothing_behind() -> None:
    bm = BlockManager(8, 4)
    a = seq(list(range(10)))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    a.num_computed_tokens = 10
    assert bm.allocate(a, 2)  # 12 tokens still fit 3 blocks
    assert len(a.block_table) == 3
    a.num_computed_tokens = 12
    assert bm.allocate(a, 1)
    assert len(a.block_table) == 4
    bm.check_invariants()
    bm.free_seq(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    bm.check_invariants()


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(3, 4)
    a = seq(list(range(20)))
    assert not bm.allocate(a, 20)
    assert a.block_table == [] and bm.num_free_blocks == 3
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    bm = BlockManager(16, 4)
    a = seq(list(range(11)), "a")
    compute(bm, a, 11)  # two full blocks registered
    b = seq(list(range(9)) + [99, 98], "b")
    hits = bm.cached_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, len(b) - 8, hits)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[hits[0]].ref_count == 2
    bm.free_seq(a)
    assert bm.blocks[hits[0]].ref_count == 1
    bm.free_seq(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_hash_is_chained_over_the_whole_prefix() -> None:
    bm = BlockManager(16, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a, 9)
    # same second block, different first one: no hit at all
    b = seq([0, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    assert bm.cached_prefix(b) == []


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = BlockManager(16, 4)
    a = seq(list(range(8)), "a")
    compute(bm, a, 8)
    assert len(bm.cached_prefix(seq(list(range(8)), "b"))) == 1  # not 2: the last token must run


def test_freed_cached_blocks_are_revived_then_evicted_least_recent_first() -> None:
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    bm.free_seq(a)  # 3 blocks free but still cached
    assert bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 9], "b")
    hits = bm.cached_prefix(b)
    assert len(hits) == 2
    assert bm.allocate(b, 1, hits)
    assert bm.num_free_blocks == 1
    bm.free_seq(b)
    # a new, unrelated sequence takes the least recently freed blocks first: a's tail block (freed
    # earlier), then the untouched one, and only then b's prefix blocks
    c = seq([7, 7, 7, 7], "c")
    assert bm.allocate(c, 4)
    assert len(bm.cached_prefix(seq([1, 2, 3, 4, 0], "d"))) == 2
    bm.check_invariants()
    e = seq([8, 8, 8, 8], "e")
    assert bm.allocate(e, 4)  # evicts the cached prefix now
    assert bm.cached_prefix(seq([1, 2, 3, 4, 0], "d")) == []
    bm.check_invariants()


def test_no_prefix_caching_means_no_hits() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = seq(list(range(9)), "a")
    compute(bm, a, 9)
    assert bm.cached_prefix(seq(list(range(9)), "b")) == []
