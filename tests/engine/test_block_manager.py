"""BlockManager: ref counts, prefix caching, revival of freed blocks, copy-on-write.

The property test drives random allocate / compute+commit / sample / fork /
finish / preempt steps and models the KV cache: `content[block][offset]` holds
what the engine would have written there, the tuple of tokens up to and
including that position (a K/V entry depends on its whole prefix, so this also
catches a prefix hit whose tokens match but whose earlier context does not).
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nanovllm.engine.block_manager import BlockManager, block_hash
from nanovllm.engine.sequence import Sequence

VOCAB = 3  # tiny, so that equal blocks (and prefix hits) are common
MAX_SEQS = 6


class KVModel:
    """A fake KV cache written exactly where the engine would write."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.content: list[list[tuple[int, ...] | None]] = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        # Like ModelRunner.copy_blocks: gather every source, then scatter.
        snapshot = [list(self.content[src]) for src, _ in copies]
        for (_, dst), data in zip(copies, snapshot):
            self.content[dst] = data

    def write(self, seq: Sequence, n: int) -> None:
        """The forward computing seq's next n tokens, then the engine's bookkeeping."""
        bs = self.bm.block_size
        for p in range(seq.num_cached_tokens, seq.num_cached_tokens + n):
            block_id = seq.block_table[p // bs]
            block = self.bm.blocks[block_id]
            assert block.ref_count == 1, f"seq {seq.seq_id} writes position {p} into shared block {block_id}"
            assert block_id not in self.bm.free_block_ids
            self.content[block_id][p % bs] = tuple(seq.token_ids[: p + 1])
        seq.num_cached_tokens += n
        self.bm.commit(seq)
        check_committed(self.bm, seq)

    def check_reads(self, seq: Sequence) -> None:
        bs = self.bm.block_size
        for p in range(seq.num_cached_tokens):
            got = self.content[seq.block_table[p // bs]][p % bs]
            assert got == tuple(seq.token_ids[: p + 1]), (
                f"seq {seq.seq_id} position {p} (block {seq.block_table[p // bs]}) holds K/V of {got}, "
                f"expected {tuple(seq.token_ids[: p + 1])}")


def check_committed(bm: BlockManager, seq: Sequence) -> None:
    """Every full computed block of seq is hashed, chained over the blocks before it."""
    if not bm.enable_prefix_caching:
        return
    bs, prev = bm.block_size, -1
    for i in range(seq.num_cached_tokens // bs):
        block = bm.blocks[seq.block_table[i]]
        tokens = seq.token_ids[i * bs : (i + 1) * bs]
        prev = block_hash(tokens, prev)
        assert (block.hash, block.token_ids) == (prev, tokens), f"seq {seq.seq_id} block {i} badly committed"


def check_accounting(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), f"seq {seq.seq_id} holds a block twice"
        for block_id in seq.block_table:
            refs[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    free = set(bm.free_block_ids)
    assert len(free) == len(bm.free_block_ids)
    assert free == {i for i, r in enumerate(refs) if r == 0}
    in_use = {b for seq in live for b in seq.block_table}
    assert not free & in_use
    assert len(in_use) + len(free) == bm.num_blocks


def must_fail(fn_name: str, bm: BlockManager, seq: Sequence) -> None:
    """Checks a `can_*` False answer: on a copy, the operation really runs out of blocks."""
    bm2, seq2 = copy.deepcopy((bm, seq))
    with pytest.raises(KeyError):
        getattr(bm2, fn_name)(seq2)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(8, 24),
        block_size=st.integers(2, 4),
        base=st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=14),
        first=st.lists(st.integers(0, VOCAB - 1), max_size=3),
    )
    def setup(self, num_blocks, block_size, base, first):
        self.bm = BlockManager(num_blocks, block_size)
        self.kv = KVModel(self.bm)
        self.base = base  # a shared prompt prefix
        self.max_len = num_blocks * block_size // 2
        self.live: list[Sequence] = []
        # two requests sharing the base prompt, so that every rule soon has work
        self.waiting: list[Sequence] = [Sequence(base[: self.max_len]), Sequence((base + first)[: self.max_len])]

    # -- helpers ----------------------------------------------------------------

    def _pick(self, seqs: list[Sequence], i: int) -> Sequence:
        return seqs[i % len(seqs)]

    def _append_slots(self, seq: Sequence) -> bool:
        """can_append + append_slots, copies applied; preempts when it does not fit."""
        bm = self.bm
        if not bm.can_append(seq):
            event("can_append False: preempted")
            must_fail("append_slots", bm, seq)
            self._preempt(seq)
            return False
        copies_before = bm.stats.block_copies
        free_before = bm.num_free_blocks
        old_table = list(seq.block_table)
        bm.append_slots(seq)
        copies = bm.take_copies()
        assert bm.take_copies() == []
        assert len(copies) == bm.stats.block_copies - copies_before
        assert free_before - bm.num_free_blocks == len(seq.block_table) - len(old_table) + len(copies)
        for src, dst in copies:
            i = old_table.index(src)
            assert seq.block_table[i] == dst and bm.blocks[dst].ref_count == 1
            assert bm.blocks[src].ref_count >= 1  # someone else still reads it
        if copies:
            event("copy-on-write")
        self.kv.apply_copies(copies)
        bs = bm.block_size
        assert len(seq.block_table) == bm.num_blocks_for(seq.num_tokens)
        for p in range(seq.num_cached_tokens, seq.num_tokens):
            assert bm.blocks[seq.block_table[p // bs]].ref_count == 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_cached_tokens == 0
        self.live.remove(seq)
        self.waiting.append(seq)

    # -- rules ------------------------------------------------------------------

    # Rules have no preconditions (Hypothesis gives up drawing a rule when few are
    # enabled); one that has nothing to do returns.

    @rule(prefix=st.integers(0, 14), suffix=st.lists(st.integers(0, VOCAB - 1), max_size=6))
    def add_request(self, prefix, suffix):
        if len(self.live) + len(self.waiting) >= MAX_SEQS:
            return
        tokens = (self.base[:prefix] + suffix)[: self.max_len] or [0]
        self.waiting.append(Sequence(tokens))

    @rule(i=st.integers(0, 100))
    def allocate(self, i):
        if not self.waiting:
            return
        bm, seq = self.bm, self._pick(self.waiting, i)
        if not bm.can_allocate(seq):
            event("can_allocate False")
            must_fail("allocate", bm, seq)
            return
        refs_before = [b.ref_count for b in bm.blocks]
        free_before, hits_before = bm.num_free_blocks, bm.stats.prefix_hit_tokens
        bm.allocate(seq)
        self.waiting.remove(seq)
        self.live.append(seq)
        bs, table = bm.block_size, seq.block_table
        assert len(table) == bm.num_blocks_for(seq.num_tokens)
        assert seq.num_cached_tokens % bs == 0
        assert seq.num_cached_tokens < seq.num_tokens  # the last token's block is never a hit
        assert bm.stats.prefix_hit_tokens - hits_before == seq.num_cached_tokens
        num_hits = seq.num_cached_tokens // bs
        # hit blocks hold exactly these tokens (and their prefix)
        for p in range(seq.num_cached_tokens):
            assert self.kv.content[table[p // bs]][p % bs] == tuple(seq.token_ids[: p + 1])
        # fresh blocks were free; revived hits come out of the free list too
        assert all(refs_before[b] == 0 for b in table[num_hits:])
        revived = sum(refs_before[b] == 0 for b in table[:num_hits])
        if num_hits:
            event("prefix hit")
        if revived:
            event("revived a freed block")
        assert free_before - bm.num_free_blocks == len(table) - num_hits + revived

    @rule(i=st.integers(0, 100), n=st.integers(1, 100))
    def compute(self, i, n):
        todo = [s for s in self.live if s.num_uncomputed_tokens > 0]
        if not todo:
            return
        seq = self._pick(todo, i)
        if self._append_slots(seq):
            self.kv.write(seq, 1 + (n - 1) % seq.num_uncomputed_tokens)

    @rule(i=st.integers(0, 100), token=st.integers(0, VOCAB - 1))
    def sample(self, i, token):
        done = [s for s in self.live if s.num_uncomputed_tokens == 0]
        if not done:
            return
        seq = self._pick(done, i)
        if seq.num_tokens >= self.max_len:
            self.finish_seq(seq)
            return
        seq.append_token(token)
        self._append_slots(seq)

    @rule(i=st.integers(0, 100), rewind=st.booleans())
    def fork(self, i, rewind):
        if not self.live or len(self.live) + len(self.waiting) >= MAX_SEQS:
            return
        parent = self._pick(self.live, i)
        child = Sequence(parent.token_ids)
        free_before = self.bm.num_free_blocks
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        assert child.num_cached_tokens == parent.num_cached_tokens
        assert self.bm.num_free_blocks == free_before
        if rewind and 0 < parent.num_cached_tokens == parent.num_tokens:
            # LLMEngine._fork: the child recomputes the prompt's last token to sample its own
            child.num_cached_tokens -= 1
            event("fork with rewind")
        self.live.append(child)

    def finish_seq(self, seq):
        self.bm.free(seq)
        self.live.remove(seq)

    @rule(i=st.integers(0, 100))
    def finish(self, i):
        if not self.live:
            return
        self.finish_seq(self._pick(self.live, i))

    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        if not self.live:
            return
        self._preempt(self._pick(self.live, i))

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def accounting(self):
        check_accounting(self.bm, self.live)
        assert all(not s.block_table and s.num_cached_tokens == 0 for s in self.waiting)

    @invariant()
    def reads_are_correct(self):
        for seq in self.live:
            assert len(seq.block_table) == self.bm.num_blocks_for(seq.num_tokens)
            self.kv.check_reads(seq)
            check_committed(self.bm, seq)

    @invariant()
    def hashed_blocks_hold_their_tokens(self):
        bm = self.bm
        for h, block_id in bm.hash_to_block_id.items():
            assert bm.blocks[block_id].hash == h
        for block in bm.blocks:
            if block.hash != -1:
                assert len(block.token_ids) == bm.block_size
                assert [c[-1] for c in self.kv.content[block.block_id]] == block.token_ids

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.live):
            self.finish_seq(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        check_accounting(self.bm, [])


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


# -- focused examples ----------------------------------------------------------


def run_prefill(bm: BlockManager, kv: KVModel, seq: Sequence) -> None:
    bm.allocate(seq)
    kv.write(seq, seq.num_uncomputed_tokens)


def test_prefix_hit_counted_in_stats():
    bm = BlockManager(16, 4)
    kv = KVModel(bm)
    shared = list(range(12))  # 3 full blocks
    a, b = Sequence(shared + [100]), Sequence(shared + [200, 201])
    run_prefill(bm, kv, a)
    assert bm.stats.prefix_hit_tokens == 0
    bm.allocate(b)
    assert b.num_cached_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    assert bm.stats.prefix_hit_tokens == 12
    assert bm.stats.prefix_query_tokens == 13 + 14
    kv.check_reads(b)
    kv.write(b, b.num_uncomputed_tokens)
    check_accounting(bm, [a, b])


def test_hit_never_includes_last_tokens_block():
    bm = BlockManager(16, 4)
    kv = KVModel(bm)
    prompt = list(range(12))  # exactly 3 full blocks
    a = Sequence(prompt)
    run_prefill(bm, kv, a)
    assert all(bm.blocks[x].hash != -1 for x in a.block_table)
    b = Sequence(prompt)
    bm.allocate(b)
    assert b.num_cached_tokens == 8  # not 12: the forward must compute the last token
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    # a single-token prompt hits nothing
    c = Sequence([0])
    d = Sequence([0])
    run_prefill(bm, kv, c)
    bm.allocate(d)
    assert d.num_cached_tokens == 0 and d.block_table != c.block_table


def test_freed_blocks_are_revived_by_a_later_hit():
    bm = BlockManager(8, 4)
    kv = KVModel(bm)
    prompt = list(range(13))  # 3 full blocks + 1 token
    a = Sequence(prompt)
    run_prefill(bm, kv, a)
    old_table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = Sequence(prompt)
    bm.allocate(b)
    assert b.num_cached_tokens == 12
    assert b.block_table[:3] == old_table[:3]
    # only the last block is handed out fresh: the first never-used block, not a cached one
    assert b.block_table[3] == 4
    assert bm.num_free_blocks == 8 - 4
    assert bm.stats.prefix_hit_tokens == 12
    kv.check_reads(b)
    # the cached blocks were not handed out: the other free blocks go first
    c = Sequence([100] * 8)
    bm.allocate(c)
    assert set(c.block_table).isdisjoint(b.block_table)


def test_eviction_is_least_recently_freed_first_tail_first():
    bm = BlockManager(8, 2)
    kv = KVModel(bm)
    pa, pb = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # 2 full blocks + 1 token each
    a, b = Sequence(pa), Sequence(pb)
    run_prefill(bm, kv, a)
    run_prefill(bm, kv, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    bm.free(a)
    bm.free(b)  # free list: never used 6, 7, then a's blocks tail first, then b's
    assert list(bm.free_block_ids) == [6, 7, 2, 1, 0, 5, 4, 3]
    x = Sequence([100 + i for i in range(8)])  # 4 blocks, no hits
    bm.allocate(x)
    assert x.num_cached_tokens == 0
    assert x.block_table == [6, 7, 2, 1]  # a's second block evicted, its first still cached
    assert list(bm.free_block_ids) == [0, 5, 4, 3]
    # a's first block is still cached, and so are both of b's
    probe_bm, probe = copy.deepcopy(bm), Sequence(pa)
    probe_bm.allocate(probe)
    assert probe.num_cached_tokens == 2 and probe.block_table[0] == 0
    b2 = Sequence(pb)
    bm.allocate(b2)  # revives 3 and 4, takes block 0 fresh: a (freed before b) is evicted first
    assert b2.num_cached_tokens == 4 and b2.block_table == [3, 4, 0]
    bm.free(x)
    a2 = Sequence(pa)
    bm.allocate(a2)
    assert a2.num_cached_tokens == 0
    kv.check_reads(b2)
    check_accounting(bm, [b2, a2])


def test_evicted_block_is_no_longer_a_hit():
    bm = BlockManager(3, 2)
    kv = KVModel(bm)
    a = Sequence([1, 2, 3])
    run_prefill(bm, kv, a)
    bm.free(a)
    x = Sequence([7, 8, 9, 9, 9, 9])  # takes every block, a's cached one included
    run_prefill(bm, kv, x)
    bm.free(x)
    a2 = Sequence([1, 2, 3])
    bm.allocate(a2)
    assert a2.num_cached_tokens == 0 and bm.stats.prefix_hit_tokens == 0


def test_fork_then_append_copies_only_the_partial_last_block():
    bm = BlockManager(16, 4)
    kv = KVModel(bm)
    parent = Sequence(list(range(10)))  # blocks: full, full, 2 of 4
    run_prefill(bm, kv, parent)
    child = Sequence(parent.token_ids)
    bm.fork(parent, child)
    parent.append_token(1)
    child.append_token(2)
    shared_last = parent.block_table[2]
    assert bm.can_append(child)
    bm.append_slots(child)
    copies = bm.take_copies()
    assert copies == [(shared_last, child.block_table[2])]
    assert child.block_table[:2] == parent.block_table[:2]  # full blocks stay shared
    bm.append_slots(parent)  # the partial block is now private to the parent: no copy
    assert bm.take_copies() == []
    assert parent.block_table[2] == shared_last
    assert bm.stats.block_copies == 1
    kv.apply_copies(copies)
    kv.write(parent, 1)
    kv.write(child, 1)
    kv.check_reads(parent)
    kv.check_reads(child)
    check_accounting(bm, [parent, child])


def test_fork_then_append_at_block_boundary_copies_nothing():
    bm = BlockManager(16, 4)
    kv = KVModel(bm)
    parent = Sequence(list(range(8)))  # exactly 2 full blocks
    run_prefill(bm, kv, parent)
    child = Sequence(parent.token_ids)
    bm.fork(parent, child)
    parent.append_token(1)
    child.append_token(2)
    bm.append_slots(child)
    bm.append_slots(parent)
    assert bm.take_copies() == [] and bm.stats.block_copies == 0
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    kv.write(parent, 1)
    kv.write(child, 1)
    check_accounting(bm, [parent, child])


def test_can_allocate_and_can_append_false_when_full():
    bm = BlockManager(4, 2)
    kv = KVModel(bm)
    a = Sequence(list(range(8)))
    assert bm.can_allocate(a)
    run_prefill(bm, kv, a)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(Sequence([50]))
    a.append_token(9)  # needs a fifth block
    assert not bm.can_append(a)
    bm.free(a)
    assert bm.can_allocate(Sequence([50]))


def test_can_append_false_when_copy_on_write_needs_a_block():
    bm = BlockManager(3, 2)
    kv = KVModel(bm)
    parent = Sequence([1, 2, 3, 4, 5])  # 3 blocks, the last one partial
    run_prefill(bm, kv, parent)
    child = Sequence(parent.token_ids)
    bm.fork(parent, child)
    child.append_token(6)
    assert not bm.can_append(child)  # the shared partial block needs a private copy
    bm.free(parent)
    assert bm.can_append(child)
    bm.append_slots(child)
    assert bm.take_copies() == []  # the parent is gone: nothing to copy


def test_can_allocate_counts_revived_blocks():
    bm = BlockManager(3, 2)
    kv = KVModel(bm)
    a = Sequence([1, 2, 3, 4, 5])
    run_prefill(bm, kv, a)
    assert bm.num_free_blocks == 0
    # a hit on a live block costs nothing, but this one needs a fresh last block
    assert not bm.can_allocate(Sequence([1, 2, 3, 4, 9]))
    bm.free(a)
    b = Sequence([1, 2, 3, 4, 5])
    assert bm.can_allocate(b)  # 2 revived + 1 fresh = all 3 free blocks
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.num_free_blocks == 0
    kv.check_reads(b)
    # revived hits come out of the free list: with one free block taken, b no longer fits
    bm.free(b)
    x = Sequence([7])
    bm.allocate(x)  # takes b's unhashed last block, the least recently freed
    b = Sequence([1, 2, 3, 4, 5])
    assert not bm.can_allocate(b)  # 2 revived + 1 fresh > 2 free
    must_fail("allocate", bm, b)


def test_hit_on_live_blocks_costs_no_free_block():
    bm = BlockManager(4, 2)
    kv = KVModel(bm)
    a = Sequence([1, 2, 3, 4, 5])
    run_prefill(bm, kv, a)
    assert bm.num_free_blocks == 1
    c = Sequence([1, 2, 3, 4, 9])
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and bm.num_free_blocks == 0
    kv.check_reads(c)
    check_accounting(bm, [a, c])


def test_no_prefix_caching():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    kv = KVModel(bm)
    a = Sequence([1, 2, 3, 4, 5])
    run_prefill(bm, kv, a)
    b = Sequence([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.stats.prefix_hit_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
