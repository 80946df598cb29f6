"""Scheduler with a real BlockManager and a fake engine loop (no model).

The fake engine pretends every scheduled token is computed, as LLMEngine does:
it applies the batch's block copies and writes each token's "K/V" (the tuple of
tokens up to it) into a fake cache through the block table, advances
num_cached_tokens, appends a token when the batch samples the sequence (forking
n > 1 children at the end of the prompt, as LLMEngine._fork does), then commits
and finishes sequences after max_tokens. With `overlap`, that read-back (commit,
finish) happens one step late, after the next schedule, as on CUDA, and the
sampled token is a PLACEHOLDER in token_ids until then.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

VOCAB = 3


class FakeEngine:
    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, overlap=False):
        self.bm = BlockManager(num_blocks, block_size)
        config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 max_model_len=num_blocks * block_size)
        self.scheduler = Scheduler(config, self.bm)
        self.overlap = overlap
        self.content = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.batches: list[ScheduledBatch] = []
        self.in_flight: list[tuple[ScheduledBatch, list[tuple[Sequence, int]]]] = []
        self.pending: dict[tuple[int, int], int] = {}  # (seq_id, index) -> value of a placeholder
        self.to_fork: dict[int, int] = {}  # seq_id -> number of children to fork when its prompt is done
        self.num_idle_schedules = 0
        self.max_running = max_num_seqs

    def add(self, prompt: list[int], max_tokens: int = 4, n: int = 1) -> Sequence:
        assert self.bm.num_blocks_for(len(prompt) + max_tokens) <= self.bm.num_blocks  # as add_request checks
        seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens))
        if n > 1:
            self.to_fork[seq.seq_id] = seq.pending_forks = n - 1
        self.seqs.append(seq)
        self.scheduler.add(seq)
        return seq

    def _fork(self, parent: Sequence) -> None:
        """Like LLMEngine._fork: children share the prompt's blocks and recompute its last token."""
        parent.pending_forks = 0
        for _ in range(self.to_fork.pop(parent.seq_id, 0)):
            child = Sequence(parent.token_ids, parent.sampling_params)
            self.bm.fork(parent, child)
            assert child.block_table == parent.block_table
            child.num_cached_tokens = child.num_tokens - 1
            child.status = SequenceStatus.RUNNING
            self.scheduler.running.append(child)
            self.seqs.append(child)

    def next_token(self, seq: Sequence) -> int:
        return (seq.num_tokens + seq.seq_id) % VOCAB

    def step(self) -> ScheduledBatch | None:
        sched = self.scheduler
        batch = sched.schedule() if sched.has_work() else None
        sampled: list[tuple[Sequence, int]] = []
        if batch is None and sched.has_work():
            # only sequences at their length limit run, awaiting their last token's read-back
            assert self.overlap and self.in_flight
            assert all(s.num_completion_tokens >= s.sampling_params.max_tokens for s in sched.running)
            self.num_idle_schedules += 1
        self.batches.append(batch)
        if batch is not None:
            self._check_batch(batch)
            self._forward(batch)
            for i, seq in enumerate(batch.seqs):  # LLMEngine._advance
                samples = batch.samples(i)
                seq.num_cached_tokens += batch.num_new_tokens[i]
                if samples:
                    if seq.num_completion_tokens == 0:
                        self._fork(seq)
                    value = self.next_token(seq)
                    seq.append_token(PLACEHOLDER if self.overlap else value)
                    self.pending[seq.seq_id, seq.num_tokens - 1] = value
                    sampled.append((seq, seq.num_tokens - 1))
            self.in_flight.append((batch, sampled))
        if len(self.in_flight) > int(self.overlap) or (batch is None and self.in_flight):
            self._complete(*self.in_flight.pop(0))
        self.check()
        return batch

    def _check_batch(self, batch: ScheduledBatch) -> None:
        sched = self.scheduler
        ids = [s.seq_id for s in batch.seqs]
        assert batch.seqs and len(ids) == len(set(ids))
        assert len(batch.seqs) == len(batch.num_new_tokens)
        assert len(sched.running) <= self.max_running
        assert len(batch.seqs) <= self.max_running
        assert all(s.status == SequenceStatus.RUNNING and s in sched.running for s in batch.seqs)
        assert all(s.num_completion_tokens < s.sampling_params.max_tokens for s in batch.seqs)
        if batch.is_prefill:
            assert sum(batch.num_new_tokens) <= sched.max_num_batched_tokens
            for seq, n in zip(batch.seqs, batch.num_new_tokens):  # as ModelRunner asserts
                assert PLACEHOLDER not in seq.token_ids[seq.num_cached_tokens : seq.num_cached_tokens + n]
        else:
            assert batch.num_new_tokens == [1] * len(batch.seqs)
            # prefill work goes first: nothing running had more than its last token to compute
            assert all(s.num_uncomputed_tokens <= 1 for s in sched.running)

    def _forward(self, batch: ScheduledBatch) -> None:
        """Copies first, then each token's K/V, written only into private blocks."""
        bm, bs = self.bm, self.bm.block_size
        snapshot = [list(self.content[src]) for src, _ in batch.block_copies]
        for (_, dst), data in zip(batch.block_copies, snapshot):
            self.content[dst] = data
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert 1 <= n <= seq.num_uncomputed_tokens
            for p in range(seq.num_cached_tokens, seq.num_cached_tokens + n):
                block = bm.blocks[seq.block_table[p // bs]]
                assert block.ref_count == 1, f"seq {seq.seq_id} writes into shared block {block.block_id}"
                self.content[block.block_id][p % bs] = self._values(seq, p + 1)

    def _values(self, seq: Sequence, n: int) -> tuple[int, ...]:
        """seq's first n tokens, placeholders replaced by the values the device already has."""
        return tuple(self.pending.get((seq.seq_id, i), t) if t == PLACEHOLDER else t
                     for i, t in enumerate(seq.token_ids[:n]))

    def _complete(self, batch: ScheduledBatch, sampled: list[Sequence]) -> None:
        """LLMEngine._complete: commit what was computed, finish what reached max_tokens."""
        for seq, index in sampled:
            value = self.pending.pop((seq.seq_id, index))
            if not seq.is_finished:
                seq.token_ids[index] = value
        for seq in batch.seqs:
            self.bm.commit(seq)
        for seq, _ in sampled:
            if not seq.is_finished and seq.num_completion_tokens >= seq.sampling_params.max_tokens:
                self.scheduler.finish(seq)
                self.finished.append(seq)

    def check(self) -> None:
        sched, bm, bs = self.scheduler, self.bm, self.bm.block_size
        live = list(sched.running)
        refs = [0] * bm.num_blocks
        for seq in live:
            assert seq.status == SequenceStatus.RUNNING
            assert len(seq.block_table) >= bm.num_blocks_for(seq.num_cached_tokens)
            for b in seq.block_table:
                refs[b] += 1
            for p in range(seq.num_cached_tokens):
                assert self.content[seq.block_table[p // bs]][p % bs] == self._values(seq, p + 1)
        for block in bm.blocks:  # a hashed block holds real tokens, never a value not read back yet
            assert block.hash == -1 or PLACEHOLDER not in block.token_ids
        assert [b.ref_count for b in bm.blocks] == refs
        assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}
        for seq in sched.waiting:
            assert seq.status == SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_cached_tokens == 0
        for seq in self.finished:
            assert seq.status == SequenceStatus.FINISHED and seq.block_table == []
        assert len(live) + len(sched.waiting) + len(self.finished) == len(self.seqs)

    def run(self, max_steps: int = 3000) -> None:
        for _ in range(max_steps):
            if not (self.scheduler.has_work() or self.in_flight):
                break
            self.step()
        assert not self.scheduler.has_work(), "did not finish"
        self.check_done()

    def check_done(self) -> None:
        bm = self.bm
        assert not self.in_flight and not self.pending
        assert bm.num_free_blocks == bm.num_blocks
        assert all(b.ref_count == 0 for b in bm.blocks)
        for seq in self.seqs:
            assert seq.is_finished
            assert seq.num_completion_tokens == seq.sampling_params.max_tokens


def test_prefill_is_scheduled_before_decode():
    eng = FakeEngine()
    a = eng.add([1, 2, 3, 4, 5], max_tokens=5)
    batch = eng.step()
    assert batch.is_prefill and batch.seqs == [a] and batch.num_new_tokens == [5]
    assert a.num_tokens == 6 and a.num_uncomputed_tokens == 1
    b = eng.add([6, 7, 8], max_tokens=5)
    batch = eng.step()
    assert batch.is_prefill and batch.seqs == [b]  # a waits while b's prompt runs
    assert a.num_tokens == 6
    batch = eng.step()
    assert not batch.is_prefill and batch.seqs == [a, b] and batch.num_new_tokens == [1, 1]
    assert a.num_tokens == 7 and b.num_tokens == 5
    eng.run()


def test_chunked_prefill_splits_a_long_prompt():
    eng = FakeEngine(max_num_batched_tokens=4)
    a = eng.add(list(range(10)), max_tokens=2)
    seen = []
    for _ in range(3):
        before = a.num_cached_tokens
        batch = eng.step()
        assert batch.is_prefill and batch.seqs == [a]
        seen.append((before, batch.num_new_tokens[0], a.num_tokens))
    # chunks of 4, 4, 2; only the last one samples (appends a token)
    assert seen == [(0, 4, 10), (4, 4, 10), (8, 2, 11)]
    batch = eng.step()
    assert not batch.is_prefill
    eng.run()


def test_chunked_prefill_last_chunk_samples():
    eng = FakeEngine(max_num_batched_tokens=3)
    a = eng.add(list(range(7)), max_tokens=1)
    samples = []
    while eng.scheduler.has_work():
        batch = eng.scheduler.schedule()
        samples.append((batch.is_prefill, batch.num_new_tokens[0], batch.samples(0)))
        assert batch.block_copies == []
        sample = batch.samples(0)
        a.num_cached_tokens += batch.num_new_tokens[0]
        eng.bm.commit(a)
        if sample:
            a.append_token(0)
            eng.scheduler.finish(a)
    # chunks of 3 and 3; the prompt's last token is left to a 1-token (decode) step, which samples
    assert samples == [(True, 3, False), (True, 3, False), (False, 1, True)]
    assert a.is_finished and eng.bm.num_free_blocks == eng.bm.num_blocks


def test_chunked_prefill_shares_the_budget():
    eng = FakeEngine(max_num_batched_tokens=4)
    a = eng.add(list(range(6)), max_tokens=3)
    b = eng.add([9, 9, 9], max_tokens=3)
    batch = eng.step()
    assert batch.seqs == [a] and batch.num_new_tokens == [4]  # the budget is spent: b waits
    assert eng.scheduler.waiting[0] is b
    batch = eng.step()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.num_new_tokens == [2, 2]  # a's chunk first
    eng.run()
    assert all(sum(x.num_new_tokens) <= 4 for x in eng.batches if x is not None)


def test_max_num_seqs_is_respected():
    eng = FakeEngine(max_num_seqs=2)
    seqs = [eng.add([i, i + 1, i + 2], max_tokens=3 + i) for i in range(5)]
    batch = eng.step()
    assert batch.seqs == seqs[:2]
    assert list(eng.scheduler.waiting) == seqs[2:]
    eng.run()
    assert max(len(x.seqs) for x in eng.batches if x is not None) == 2
    assert eng.finished[0] is seqs[0]


def test_max_num_seqs_counts_forked_children():
    eng = FakeEngine(max_num_seqs=4)
    eng.add([1, 2, 3], max_tokens=3, n=3)
    eng.add([4, 5, 6], max_tokens=3, n=2)  # waits: 3 + 2 > 4
    eng.step()
    assert len(eng.scheduler.running) == 3 and len(eng.scheduler.waiting) == 1


def test_decode_preempts_the_latest_arrival_when_the_cache_is_full():
    eng = FakeEngine(num_blocks=6, block_size=2)
    a, b, c = (eng.add([1 + i, 2, 3], max_tokens=4) for i in range(3))
    batch = eng.step()  # prefill: 2 blocks each, the cache is full
    assert batch.seqs == [a, b, c] and eng.bm.num_free_blocks == 0
    d = eng.add([7], max_tokens=1)
    batch = eng.step()  # d does not fit; decode: the 4th token fits in the second block
    assert not batch.is_prefill and batch.seqs == [a, b, c] and eng.scheduler.num_preemptions == 0
    assert list(eng.scheduler.waiting) == [d]
    c_blocks = list(c.block_table)
    batch = eng.step()  # decode: each needs a third block; c, the latest, makes room
    assert eng.scheduler.num_preemptions == 1
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert list(eng.scheduler.waiting) == [c, d]  # back at the front, ahead of d
    assert c.status == SequenceStatus.WAITING and c not in eng.scheduler.running
    assert c.block_table == [] and c.num_cached_tokens == 0
    assert set(c_blocks) == {a.block_table[2], b.block_table[2]}  # its blocks went to a and b
    assert c.num_tokens == 5  # its generated tokens are kept, to be recomputed
    eng.run()
    assert eng.scheduler.num_preemptions == 1
    assert c.num_completion_tokens == 4 and d.is_finished


def test_preemption_recomputes_with_prefix_hits_and_finishes():
    eng = FakeEngine(num_blocks=8, block_size=2)
    seqs = [eng.add([1, 2, 3, 4, 5, i], max_tokens=6) for i in range(3)]  # share 2 full blocks
    while eng.scheduler.num_preemptions == 0:
        eng.step()
    hits_at_preemption = eng.bm.stats.prefix_hit_tokens
    eng.run()
    assert eng.scheduler.num_preemptions >= 2
    # the preempted sequences found their computed blocks again when readmitted
    assert eng.bm.stats.prefix_hit_tokens > hits_at_preemption
    for s in seqs:
        assert s.num_completion_tokens == 6


def test_overlap_holds_a_sequence_at_its_limit_until_read_back():
    eng = FakeEngine(overlap=True)
    a = eng.add([1, 2, 3], max_tokens=1)
    assert eng.step() is not None  # prefill samples a's only token; read back one step later
    assert eng.step() is None  # a is at its limit: nothing to run, and a is finished now
    assert a.is_finished and not eng.scheduler.has_work()
    eng.run()


def test_block_copies_after_fork_appear_in_the_batch():
    eng = FakeEngine(block_size=4)
    parent = eng.add(list(range(6)), max_tokens=3, n=2)  # blocks: full, 2 of 4
    batch = eng.step()  # prefill; the child forks when the prompt is done
    assert batch.is_prefill and batch.seqs == [parent]
    child = eng.seqs[1]
    assert child.block_table == parent.block_table and child.num_cached_tokens == 5
    assert parent.num_tokens == 7 and parent.num_uncomputed_tokens == 1
    shared = list(parent.block_table)
    assert [eng.bm.blocks[b].ref_count for b in shared] == [2, 2]
    batch = eng.step()
    assert not batch.is_prefill and batch.seqs == [parent, child]
    assert len(batch.block_copies) == 1
    src, dst = batch.block_copies[0]
    assert src == shared[1]  # only the partly filled block that both write into
    assert {parent.block_table[1], child.block_table[1]} == {src, dst}
    assert parent.block_table[0] == child.block_table[0] == shared[0]
    assert eng.bm.stats.block_copies == 1
    batch = eng.step()
    assert batch.block_copies == []  # both now write into private blocks
    eng.run()
    assert eng.bm.stats.block_copies == 1


def test_fork_at_a_block_boundary_copies_the_block_the_child_rewrites():
    eng = FakeEngine(block_size=4)
    parent = eng.add(list(range(8)), max_tokens=3, n=3)  # 2 full blocks
    eng.step()
    children = eng.seqs[1:]
    assert len(children) == 2 and all(c.num_cached_tokens == 7 for c in children)
    batch = eng.step()
    # the parent's next token opens a new block; each child rewrites position 7 into its own copy
    assert len(batch.block_copies) == 2
    assert [src for src, _ in batch.block_copies] == [parent.block_table[1]] * 2
    assert len({c.block_table[1] for c in [parent, *children]}) == 3
    assert len({c.block_table[0] for c in [parent, *children]}) == 1
    eng.run()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(6, 20),
    block_size=st.integers(1, 4),
    max_num_seqs=st.integers(1, 5),
    max_num_batched_tokens=st.integers(1, 16),
    overlap=st.booleans(),
    base=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
    requests=st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, VOCAB - 1), max_size=4),
                                st.integers(1, 6), st.sampled_from([1, 1, 1, 2, 3])), min_size=1, max_size=6),
)
def test_random_workloads_finish_without_leaks(num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                                                 overlap, base, requests):
    eng = FakeEngine(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, overlap)
    capacity = num_blocks * block_size
    for prefix, suffix, max_tokens, n in requests:
        prompt = (base[:prefix] + suffix)[: capacity - 1] or [0]
        eng.add(prompt, min(max_tokens, capacity - len(prompt)), min(n, max_num_seqs))  # as add_request checks
    forks = bool(eng.to_fork)
    for _ in range(3000):
        if not (eng.scheduler.has_work() or eng.in_flight):
            break
        running_before = list(eng.scheduler.running)
        preemptions = eng.scheduler.num_preemptions
        batch = eng.step()
        preempted = [s for s in running_before if s.status == SequenceStatus.WAITING]
        assert len(preempted) <= eng.scheduler.num_preemptions - preemptions
        if preempted and not forks and batch is not None:
            # children forked after the fact arrive out of order; otherwise running is in
            # arrival order and the latest arrivals are the ones preempted
            assert min(s.seq_id for s in preempted) > max(s.seq_id for s in batch.seqs)
            assert list(eng.scheduler.waiting)[: len(preempted)] == sorted(preempted, key=lambda s: s.seq_id)
    eng.run(max_steps=1)
    stats = eng.bm.stats
    for name, happened in [("preemption", eng.scheduler.num_preemptions), ("prefix hit", stats.prefix_hit_tokens),
                           ("copy-on-write", stats.block_copies), ("idle schedule", eng.num_idle_schedules)]:
        if happened:
            event(name)
