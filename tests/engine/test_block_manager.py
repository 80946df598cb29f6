"""BlockManager: ref counts, prefix caching, revival of freed blocks, copy-on-write.

Sequences move only through the real code: `BlockManager` for blocks, `Scheduler.advance`
/ `update` / `fork` / `preempt` / `finish` for their counts and tokens. The test plays the
model runner: `KVModel` writes each computed token's "K/V" (the tuple of tokens up to and
including it: a K/V entry depends on its whole prefix, so this also catches a prefix hit
whose tokens match but whose earlier context does not) where the block table says, and the
test picks the sampled token.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nanovllm.engine.block_manager import BlockManager, block_hash
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

VOCAB = 3  # tiny, so that equal blocks (and prefix hits) are common
MAX_SEQS = 6


def make_scheduler(bm: BlockManager, max_model_len: int = 1 << 20) -> Scheduler:
    config = SimpleNamespace(max_num_seqs=MAX_SEQS, max_num_batched_tokens=1 << 20,
                             max_model_len=max_model_len, eos_token_ids=[])
    return Scheduler(config, bm)


class KVModel:
    """A fake KV cache written exactly where the model runner would write."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.content: list[list[tuple[int, ...] | None]] = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        # Like KVCache.copy_blocks: gather every source, then scatter.
        snapshot = [list(self.content[src]) for src, _ in copies]
        for (_, dst), data in zip(copies, snapshot):
            self.content[dst] = data

    def forward(self, batch: ScheduledBatch) -> None:
        """Write the K/V of each sequence's next num_new_tokens tokens, only into private blocks."""
        self.apply_copies(batch.block_copies)
        bs = self.bm.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                assert seq.token_ids[p] != PLACEHOLDER
                block_id = seq.block_table[p // bs]
                block = self.bm.blocks[block_id]
                assert block.ref_count == 1, f"seq {seq.seq_id} writes position {p} into shared block {block_id}"
                self.content[block_id][p % bs] = tuple(seq.token_ids[: p + 1])

    def check_reads(self, seq: Sequence) -> None:
        bs = self.bm.block_size
        for p in range(seq.num_computed_tokens):
            got = self.content[seq.block_table[p // bs]][p % bs]
            assert got == tuple(seq.token_ids[: p + 1]), (
                f"seq {seq.seq_id} position {p} (block {seq.block_table[p // bs]}) holds K/V of {got}, "
                f"expected {tuple(seq.token_ids[: p + 1])}")


def launch(sched: Scheduler, kv: KVModel, seq: Sequence, n: int) -> ScheduledBatch:
    """One forward of seq's next n tokens, as the engine launches it (the cache already covers them).
    The n > 1 children `advance` forks join the scheduler's running sequences."""
    batch = ScheduledBatch([seq], [n], block_copies=sched.block_manager.take_copies())
    kv.forward(batch)
    if sched.advance(batch):
        event("n > 1 fork")
    return batch


def complete(sched: Scheduler, batch: ScheduledBatch, token: int = 0) -> None:
    sched.update(batch, [token] * len(batch.sampled) or None)


def prefill(sched: Scheduler, kv: KVModel, tokens: list[int], token: int = 0) -> Sequence:
    """A new sequence allocated, its prompt computed and its first token sampled and committed."""
    seq = admit(sched, sched.new_sequence(tokens, SamplingParams()))
    complete(sched, launch(sched, kv, seq, seq.num_uncomputed_tokens), token)
    return seq


def admit(sched: Scheduler, seq: Sequence) -> Sequence:
    assert sched.block_manager.allocate(seq)
    admit_moves(sched, seq)
    return seq


def admit_moves(sched: Scheduler, seq: Sequence) -> None:
    """The queue moves of an admission whose allocate succeeded. Scheduler.schedule admits only
    the first waiting sequence; the block-manager tests pick any."""
    sched.waiting.remove(seq)
    seq.status = SequenceStatus.RUNNING
    sched.running.append(seq)


def waiting(sched: Scheduler, tokens: list[int]) -> Sequence:
    return sched.new_sequence(tokens, SamplingParams())


def check_committed(bm: BlockManager, seq: Sequence) -> None:
    """Every block full of committed tokens is hashed, chained over the blocks before it."""
    assert seq.num_committed_tokens <= seq.num_computed_tokens
    if not bm.enable_prefix_caching:
        return
    bs, prev = bm.block_size, -1
    for i in range(seq.num_committed_tokens // bs):
        block = bm.blocks[seq.block_table[i]]
        tokens = seq.token_ids[i * bs : (i + 1) * bs]
        prev = block_hash(tokens, prev)
        assert (block.hash, block.token_ids) == (prev, tokens), f"seq {seq.seq_id} block {i} badly committed"


def check_accounting(bm: BlockManager, live: list[Sequence]) -> None:
    """Ref counts are the number of live tables holding each block; the free list is the rest."""
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), f"seq {seq.seq_id} holds a block twice"
        for block_id in seq.block_table:
            refs[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}
    assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
    if bm.num_sink_blocks:  # first blocks are sink blocks, and only first blocks are
        for seq in live:
            assert [b < bm.num_sink_blocks for b in seq.block_table] == [i == 0 for i in range(len(seq.block_table))]
    assert bm.num_used_blocks == sum(r > 0 for r in refs)


def snapshot(bm: BlockManager, seq: Sequence) -> object:
    """Everything a failed allocate/append_slots must leave as it was."""
    return copy.deepcopy((
        [(b.ref_count, b.hash, b.token_ids) for b in bm.blocks], list(bm.free_block_ids), bm.hash_to_block_id,
        bm.pending_copies, bm.stats, seq.block_table, seq.num_computed_tokens, seq.num_committed_tokens,
    ))


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / launch (append_slots, advance) / complete (update: commit, finish on
    length) / fork / preempt / finish, failing allocations included, in a small cache."""

    @initialize(
        num_blocks=st.integers(4, 16),
        block_size=st.integers(1, 4),
        base=st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=14),
        first=st.lists(st.integers(0, VOCAB - 1), max_size=3),
        prefix_caching=st.sampled_from([True, True, True, False]),
        sinks=st.sampled_from([0, 0, 1, 3]),
    )
    def setup(self, num_blocks, block_size, base, first, prefix_caching, sinks):
        self.bm = BlockManager(num_blocks, block_size, prefix_caching, num_sink_blocks=sinks)
        self.max_len = self.bm.max_blocks_per_seq * block_size
        self.sched = make_scheduler(self.bm, self.max_len)
        self.kv = KVModel(self.bm)
        self.base = base  # a shared prompt prefix
        self.in_flight: dict[int, tuple[ScheduledBatch, int]] = {}  # seq_id -> launched batch, token it samples
        # two requests sharing the base prompt, so that every rule soon has work
        for tokens in (base, base + first):
            self._new(tokens, 8, 1)

    # -- helpers ----------------------------------------------------------------

    def _new(self, tokens: list[int], max_tokens: int, n: int) -> None:
        self.sched.new_sequence(tokens[: self.max_len - 1] or [0], SamplingParams(max_tokens=max_tokens, n=n))

    def _live(self) -> list[Sequence]:
        return list(self.sched.running)

    def _idle(self, seqs) -> list[Sequence]:
        return [s for s in seqs if s.seq_id not in self.in_flight]

    def _preempt(self, seq: Sequence) -> None:
        self.sched.running.remove(seq)
        self.sched.preempt(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == seq.num_committed_tokens == 0
        assert self.sched.waiting[0] is seq

    # -- rules ------------------------------------------------------------------

    # Rules have no preconditions (Hypothesis gives up drawing a rule when few are
    # enabled); one that has nothing to do returns.

    @rule(prefix=st.integers(0, 14), suffix=st.lists(st.integers(0, VOCAB - 1), max_size=30),
          max_tokens=st.integers(1, 8), n=st.sampled_from([1, 1, 2]))
    def add_request(self, prefix, suffix, max_tokens, n):
        if len(self.sched.running) + len(self.sched.waiting) < MAX_SEQS:
            self._new(self.base[:prefix] + suffix, max_tokens, n)

    @rule(i=st.integers(0, 100))
    def allocate(self, i):
        candidates = self._idle(self.sched.waiting)  # a preempted sequence waits for its read-back first
        if not candidates:
            return
        bm, seq = self.bm, candidates[i % len(candidates)]
        before = snapshot(bm, seq)
        refs_before = [b.ref_count for b in bm.blocks]
        free_before = bm.num_free_blocks
        if not bm.allocate(seq):
            event("allocate failed")
            assert snapshot(bm, seq) == before
            return
        admit_moves(self.sched, seq)
        bs, table = bm.block_size, seq.block_table
        assert len(table) == bm.num_blocks_for(seq.num_tokens)
        assert seq.num_computed_tokens == seq.num_committed_tokens and seq.num_computed_tokens % bs == 0
        assert seq.num_computed_tokens < seq.num_tokens  # the last token's block is never a hit
        num_hits = seq.num_computed_tokens // bs
        assert all(refs_before[b] == 0 for b in table[num_hits:])  # fresh blocks were free
        revived = sum(refs_before[b] == 0 for b in table[:num_hits])  # revived hits come out of the free list
        assert free_before - bm.num_free_blocks == len(table) - num_hits + revived
        if num_hits:
            event("prefix hit")
        if revived:
            event("revived a freed block")

    @rule(i=st.integers(0, 100), n=st.integers(1, 100), token=st.integers(0, VOCAB - 1))
    def launch(self, i, n, token):
        """append_slots (copy-on-write) then one forward of up to n tokens; preempted when it does not fit."""
        todo = [s for s in self._idle(self.sched.running) if not s.at_length_limit(self.max_len)]
        if not todo:
            return
        bm, seq = self.bm, todo[i % len(todo)]
        before = snapshot(bm, seq)
        old_table = list(seq.block_table)
        free_before, copies_before = bm.num_free_blocks, bm.stats.block_copies
        if not bm.append_slots(seq):
            event("append_slots failed: preempted")
            assert snapshot(bm, seq) == before
            self._preempt(seq)
            return
        copies = list(bm.pending_copies)
        assert len(copies) == bm.stats.block_copies - copies_before
        assert free_before - bm.num_free_blocks == len(seq.block_table) - len(old_table) + len(copies)
        for src, dst in copies:
            assert seq.block_table[old_table.index(src)] == dst and bm.blocks[dst].ref_count == 1
            assert bm.blocks[src].ref_count >= 1  # someone else still reads it
            event("copy-on-write")
        assert len(seq.block_table) == bm.num_blocks_for(seq.num_tokens)
        batch = launch(self.sched, self.kv, seq, 1 + (n - 1) % seq.num_uncomputed_tokens)
        self.in_flight[seq.seq_id] = (batch, token)

    @rule(i=st.integers(0, 100))
    def complete(self, i):
        """Read a launched batch back: commit its tokens, fill the sampled one, finish on length."""
        if not self.in_flight:
            return
        seq_id = sorted(self.in_flight)[i % len(self.in_flight)]
        batch, token = self.in_flight.pop(seq_id)
        complete(self.sched, batch, token)
        if batch.seqs[0].is_finished:
            event("finished on length")

    @rule(i=st.integers(0, 100), last_token=st.none() | st.integers(0, VOCAB - 1))
    def fork(self, i, last_token):
        """A plain fork, or beam search's: the child continues with another uncomputed last token.
        (n > 1 forks, which recompute the prompt's last token, happen in `launch`.)"""
        parents = self._idle(self.sched.running)
        if not parents or len(self.sched.running) + len(self.sched.waiting) >= MAX_SEQS:
            return
        parent = parents[i % len(parents)]
        last_tokens = [last_token] if last_token is not None and parent.num_uncomputed_tokens else None
        free_before = self.bm.num_free_blocks
        [child] = self.sched.fork(parent, 1, last_tokens=last_tokens)
        assert child.block_table == parent.block_table and child.token_ids[:-1] == parent.token_ids[:-1]
        assert child.num_computed_tokens == parent.num_computed_tokens
        assert self.bm.num_free_blocks == free_before
        if last_tokens:
            event("fork with another last token")

    @rule(i=st.integers(0, 100))
    def finish(self, i):
        seqs = [*self.sched.running, *self.sched.waiting]
        if seqs:
            seq = seqs[i % len(seqs)]
            self.sched.finish(seq, "abort")
            assert seq.block_table == [] and PLACEHOLDER not in seq.token_ids

    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        if self.sched.running:
            self._preempt(self.sched.running[i % len(self.sched.running)])

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def accounting(self):
        check_accounting(self.bm, self._live())
        for seq in self.sched.waiting:
            assert seq.status == SequenceStatus.WAITING
            assert not seq.block_table and seq.num_computed_tokens == seq.num_committed_tokens == 0

    @invariant()
    def reads_are_correct(self):
        for seq in self._live():
            assert seq.status == SequenceStatus.RUNNING
            assert self.bm.num_blocks_for(seq.num_computed_tokens) <= len(seq.block_table)
            self.kv.check_reads(seq)
            check_committed(self.bm, seq)

    @invariant()
    def hashed_blocks_hold_their_tokens(self):
        bm = self.bm
        for h, block_id in bm.hash_to_block_id.items():
            assert bm.blocks[block_id].hash == h
        for block in bm.blocks:
            if block.hash != -1:
                assert len(block.token_ids) == bm.block_size and PLACEHOLDER not in block.token_ids
                assert [c[-1] for c in self.kv.content[block.block_id]] == block.token_ids

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in [*self.sched.running, *self.sched.waiting]:
            self.sched.finish(seq, "abort")
        for batch, token in self.in_flight.values():  # read back after the abort: nothing to take
            assert self.sched.update(batch, [token] * len(batch.sampled) or None) == []
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_used_blocks == 0
        check_accounting(self.bm, [])


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


# -- focused examples ----------------------------------------------------------


def setup(num_blocks: int, block_size: int, **kwargs) -> tuple[BlockManager, Scheduler, KVModel]:
    bm = BlockManager(num_blocks, block_size, **kwargs)
    return bm, make_scheduler(bm), KVModel(bm)


def test_prefix_hit_counted_in_stats():
    bm, sched, kv = setup(16, 4)
    shared = list(range(12))  # 3 full blocks
    a = prefill(sched, kv, shared + [100])
    assert bm.stats.prefix_hit_tokens == 0
    b = admit(sched, waiting(sched, shared + [200, 201]))
    assert b.num_computed_tokens == b.num_committed_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    assert bm.stats.prefix_hit_tokens == 12
    assert bm.stats.prefix_query_tokens == 13 + 14
    kv.check_reads(b)
    complete(sched, launch(sched, kv, b, b.num_uncomputed_tokens))
    check_accounting(bm, [a, b])


def test_hit_never_includes_last_tokens_block():
    bm, sched, kv = setup(16, 4)
    prompt = list(range(12))  # exactly 3 full blocks
    a = prefill(sched, kv, prompt)
    assert all(bm.blocks[x].hash != -1 for x in a.block_table)
    b = admit(sched, waiting(sched, prompt))
    assert b.num_computed_tokens == 8  # not 12: the forward must compute the last token
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    # a single-token prompt hits nothing
    c = prefill(sched, kv, [0])
    d = admit(sched, waiting(sched, [0]))
    assert d.num_computed_tokens == 0 and d.block_table != c.block_table


def test_freed_blocks_are_revived_by_a_later_hit():
    bm, sched, kv = setup(8, 4)
    prompt = list(range(13))  # 3 full blocks + 1 token
    a = prefill(sched, kv, prompt)
    old_table = list(a.block_table)
    sched.finish(a, "stop")
    assert bm.num_free_blocks == 8
    b = admit(sched, waiting(sched, prompt))
    assert b.num_computed_tokens == 12
    assert b.block_table[:3] == old_table[:3]
    # only the last block is handed out fresh: the first never-used block, not a cached one
    assert b.block_table[3] == 4
    assert bm.num_free_blocks == 8 - 4
    assert bm.stats.prefix_hit_tokens == 12
    kv.check_reads(b)
    # the cached blocks were not handed out: the other free blocks go first
    c = admit(sched, waiting(sched, [100] * 8))
    assert set(c.block_table).isdisjoint(b.block_table)


def test_eviction_is_least_recently_freed_first_tail_first():
    bm, sched, kv = setup(8, 2)
    pa, pb = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # 2 full blocks + 1 token each
    a, b = prefill(sched, kv, pa), prefill(sched, kv, pb)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    sched.finish(a, "stop")
    sched.finish(b, "stop")  # free list: never used 6, 7, then a's blocks tail first, then b's
    assert list(bm.free_block_ids) == [6, 7, 2, 1, 0, 5, 4, 3]
    x = admit(sched, waiting(sched, [100 + i for i in range(8)]))  # 4 blocks, no hits
    assert x.num_computed_tokens == 0
    assert x.block_table == [6, 7, 2, 1]  # a's second block evicted, its first still cached
    assert list(bm.free_block_ids) == [0, 5, 4, 3]
    # a's first block is still cached, and so are both of b's
    probe_bm = copy.deepcopy(bm)
    probe = Sequence(-1, pa, SamplingParams())
    assert probe_bm.allocate(probe)
    assert probe.num_computed_tokens == 2 and probe.block_table[0] == 0
    b2 = admit(sched, waiting(sched, pb))  # revives 3 and 4, takes block 0 fresh: a (freed before b) goes first
    assert b2.num_computed_tokens == 4 and b2.block_table == [3, 4, 0]
    sched.finish(x, "stop")
    a2 = admit(sched, waiting(sched, pa))
    assert a2.num_computed_tokens == 0
    kv.check_reads(b2)
    check_accounting(bm, [b2, a2])


def test_evicted_block_is_no_longer_a_hit():
    bm, sched, kv = setup(3, 2)
    a = prefill(sched, kv, [1, 2, 3])
    sched.finish(a, "stop")
    x = prefill(sched, kv, [7, 8, 9, 9, 9])  # takes every block, a's cached one included
    sched.finish(x, "stop")
    a2 = admit(sched, waiting(sched, [1, 2, 3]))
    assert a2.num_computed_tokens == 0 and bm.stats.prefix_hit_tokens == 0


def test_fork_then_append_copies_only_the_partial_last_block():
    bm, sched, kv = setup(16, 4)
    parent = prefill(sched, kv, list(range(9)), token=1)  # blocks: full, full, 2 of 4 (9 computed + 1 sampled)
    [child] = sched.fork(parent, 1, last_tokens=[2])  # beam search: the child continues with another token
    assert child.token_ids[-1] == 2 and parent.token_ids[-1] == 1
    shared_last = parent.block_table[2]
    assert bm.append_slots(child)
    copies = bm.take_copies()
    assert copies == [(shared_last, child.block_table[2])]
    assert child.block_table[:2] == parent.block_table[:2]  # full blocks stay shared
    assert bm.append_slots(parent)  # the partial block is now private to the parent: no copy
    assert bm.take_copies() == []
    assert parent.block_table[2] == shared_last
    assert bm.stats.block_copies == 1
    kv.apply_copies(copies)
    complete(sched, launch(sched, kv, parent, 1))
    complete(sched, launch(sched, kv, child, 1))
    kv.check_reads(parent)
    kv.check_reads(child)
    check_accounting(bm, [parent, child])


def test_fork_then_append_at_block_boundary_copies_nothing():
    bm, sched, kv = setup(16, 4)
    parent = prefill(sched, kv, list(range(8)), token=1)  # exactly 2 full blocks, then the sampled token
    [child] = sched.fork(parent, 1, last_tokens=[2])
    assert bm.append_slots(child)
    assert bm.append_slots(parent)
    assert bm.take_copies() == [] and bm.stats.block_copies == 0
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    complete(sched, launch(sched, kv, parent, 1))
    complete(sched, launch(sched, kv, child, 1))
    check_accounting(bm, [parent, child])


def test_allocate_and_append_slots_fail_when_full():
    bm, sched, kv = setup(4, 2)
    a = admit(sched, waiting(sched, list(range(7))))
    complete(sched, launch(sched, kv, a, 7))  # 8 tokens now, in all 4 blocks
    assert bm.num_free_blocks == 0
    c = waiting(sched, [50])
    assert not bm.allocate(c) and c.block_table == []
    complete(sched, launch(sched, kv, a, 1))  # the 9th token needs a fifth block
    before = snapshot(bm, a)
    assert not bm.append_slots(a)
    assert snapshot(bm, a) == before
    sched.finish(a, "abort")
    assert bm.allocate(c)


def test_append_slots_fails_when_copy_on_write_needs_a_block():
    bm, sched, kv = setup(3, 2)
    parent = prefill(sched, kv, [1, 2, 3, 4, 5], token=6)  # 3 blocks, the last one holding 5 and 6
    [child] = sched.fork(parent, 1, last_tokens=[7])
    before = snapshot(bm, child)
    assert not bm.append_slots(child)  # the shared partial block needs a private copy: none free
    assert snapshot(bm, child) == before
    sched.finish(parent, "stop")
    assert bm.append_slots(child)
    assert bm.take_copies() == []  # the parent is gone: nothing shared to copy


def test_allocate_counts_revived_blocks():
    bm, sched, kv = setup(3, 2)
    a = prefill(sched, kv, [1, 2, 3, 4, 5])
    assert bm.num_free_blocks == 0
    # a hit on a live block costs nothing, but this one needs a fresh last block
    assert not bm.allocate(waiting(sched, [1, 2, 3, 4, 9]))
    sched.finish(a, "stop")
    b = admit(sched, waiting(sched, [1, 2, 3, 4, 5]))  # 2 revived + 1 fresh = all 3 free blocks
    assert b.num_computed_tokens == 4 and bm.num_free_blocks == 0
    kv.check_reads(b)
    # revived hits come out of the free list: with one free block taken, b no longer fits
    sched.finish(b, "stop")
    admit(sched, waiting(sched, [7]))  # takes b's unhashed last block, the least recently freed
    b = waiting(sched, [1, 2, 3, 4, 5])
    before = snapshot(bm, b)
    assert not bm.allocate(b)  # 2 revived + 1 fresh > 2 free
    assert snapshot(bm, b) == before


def test_failed_allocation_leaves_prefix_hits_untouched():
    """A cached prefix that fits but a tail that does not: no ref count, free slot or hash moves."""
    bm, sched, kv = setup(6, 2)
    a = prefill(sched, kv, [1, 2, 3, 4, 5, 6, 7])  # 4 blocks, 3 full and hashed
    cached = a.block_table[:3]
    sched.finish(a, "stop")
    other = admit(sched, waiting(sched, [9, 9, 9]))  # 2 never-used blocks
    assert set(other.block_table).isdisjoint(cached)
    live_hit = prefill(sched, kv, [1, 2, 8])  # revives a's first block and keeps it live
    assert live_hit.block_table[0] == cached[0] and bm.blocks[cached[0]].ref_count == 1
    seq = waiting(sched, [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0])  # hits 3 blocks (1 live, 2 free), needs 3 fresh
    assert bm.num_free_blocks == 2
    before = snapshot(bm, seq)
    assert not bm.allocate(seq)
    assert snapshot(bm, seq) == before
    check_accounting(bm, [other, live_hit])
    sched.finish(other, "stop")  # 4 free blocks: still short of 2 revived + 3 fresh
    before = snapshot(bm, seq)
    assert not bm.allocate(seq)
    assert snapshot(bm, seq) == before
    sched.finish(live_hit, "stop")
    assert bm.allocate(seq) and seq.num_computed_tokens == 6
    check_accounting(bm, [seq])


def test_hit_on_live_blocks_costs_no_free_block():
    bm, sched, kv = setup(4, 2)
    a = prefill(sched, kv, [1, 2, 3, 4, 5])
    assert bm.num_free_blocks == 1
    c = admit(sched, waiting(sched, [1, 2, 3, 4, 9]))
    assert c.num_computed_tokens == 4 and bm.num_free_blocks == 0
    kv.check_reads(c)
    check_accounting(bm, [a, c])


def test_no_prefix_caching():
    bm, sched, kv = setup(8, 2, enable_prefix_caching=False)
    a = prefill(sched, kv, [1, 2, 3, 4, 5])
    assert all(bm.blocks[x].hash == -1 for x in a.block_table) and not bm.hash_to_block_id
    b = admit(sched, waiting(sched, [1, 2, 3, 4, 5]))
    assert b.num_computed_tokens == 0 and bm.stats.prefix_hit_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)


# -- sink blocks (an FP8 cache's first blocks) -----------------------------------


def test_sink_blocks_hold_first_blocks_only():
    bm, sched, kv = setup(10, 4, num_sink_blocks=2)
    a = prefill(sched, kv, list(range(9)))  # 3 blocks
    assert a.block_table[0] < 2 and min(a.block_table[1:]) >= 2
    b = admit(sched, waiting(sched, list(range(100, 105))))
    assert b.block_table[0] < 2 and b.block_table[1] >= 2
    c = waiting(sched, [7, 8])  # both sink blocks are taken, plenty of others are free
    assert bm.num_free_blocks >= 3 and not bm.allocate(c) and c.block_table == []
    assert bm.max_blocks_per_seq == 9
    check_accounting(bm, [a, b])


def test_sink_block_hit_revived_and_copied_on_write_into_a_sink_block():
    bm, sched, kv = setup(10, 4, num_sink_blocks=3)
    a = prefill(sched, kv, list(range(6)))  # a full first block, committed and hashed
    first = a.block_table[0]
    sched.finish(a, "stop")
    b = admit(sched, waiting(sched, list(range(4)) + [50, 51]))  # its first block: a hit on the freed one
    assert b.block_table[0] == first and b.num_computed_tokens == 4
    parent = prefill(sched, kv, [9, 9], token=1)  # a partial first block
    [child] = sched.fork(parent, 1, last_tokens=[2])
    assert bm.append_slots(child)
    [(src, dst)] = bm.take_copies()
    assert src == parent.block_table[0] and dst == child.block_table[0] and dst < 3 and src < 3
    check_accounting(bm, [b, parent, child])
    other = waiting(sched, [5])  # the three sink blocks are taken: a copy-on-write needs a fourth
    assert not bm.allocate(other)
