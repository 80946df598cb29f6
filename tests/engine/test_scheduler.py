"""Scheduler with a real BlockManager, driven as LLMEngine.step drives it (no model).

The test plays the model runner only: it applies each batch's block copies, writes each
computed token's "K/V" (the tuple of tokens up to it) into a fake cache through the block
table, and picks the sampled tokens. Every transition is the real code:
`schedule`, `advance` (count launched tokens, placeholders, n > 1 forks), `update` (fill
placeholders, commit, finish on the length rule). With `overlap` the read-back (`update`)
happens one step late, after the next `schedule` and launch, as on CUDA; the device already
has the sampled values, so the next forward reads them.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

VOCAB = 3


class Driver:
    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, overlap=False,
                 eos_token_ids=()):
        self.bm = BlockManager(num_blocks, block_size)
        config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 max_model_len=num_blocks * block_size, eos_token_ids=list(eos_token_ids))
        self.scheduler = Scheduler(config, self.bm)
        self.overlap = overlap
        self.content = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: list[Sequence] = []
        self.batches: list[ScheduledBatch | None] = []
        self.in_flight: list[ScheduledBatch] = []
        self.device: dict[tuple[int, int], int] = {}  # (seq_id, index) -> sampled value not read back yet
        self.num_idle_schedules = 0
        self.kv_slots_allocated = self.kv_slots_filled = 0  # KVUsage, counted here from the block tables

    def _count_kv_slots(self) -> None:
        """Slots of every used block, and those holding a computed token of some sequence that holds it."""
        bs = self.bm.block_size
        blocks = {b for seq in self.scheduler.running for b in seq.block_table}
        filled = {(seq.block_table[p // bs], p % bs) for seq in self.scheduler.running
                  for p in range(seq.num_computed_tokens)}
        self.kv_slots_allocated += len(blocks) * bs
        self.kv_slots_filled += len(filled)

    def add(self, prompt: list[int], max_tokens: int = 4, n: int = 1) -> Sequence:
        assert self.bm.num_blocks_for(len(prompt) + max_tokens) <= self.bm.num_blocks  # as add_request checks
        seq = self.scheduler.new_sequence(prompt, SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True))
        self.seqs.append(seq)
        return seq

    @property
    def finished(self) -> list[Sequence]:
        return [s for s in self.seqs if s.is_finished]

    def sample(self, seq: Sequence, index: int) -> int:
        return (index + seq.seq_id) % VOCAB

    def step(self) -> ScheduledBatch | None:
        """LLMEngine.step: schedule, launch (the forward) and advance, then read back a step."""
        sched = self.scheduler
        batch = sched.schedule() if sched.has_work() else None
        if batch is None and sched.has_work():
            # only sequences at their length limit run, awaiting their last token's read-back
            assert self.overlap and self.in_flight
            assert all(s.at_length_limit(sched.max_model_len) for s in sched.running)
            self.num_idle_schedules += 1
        self.batches.append(batch)
        if batch is not None:
            self._check_batch(batch)
            self._forward(batch)
            self.seqs += sched.advance(batch)
            self._count_kv_slots()
            for seq, index in batch.sampled:
                assert seq.token_ids[index] == PLACEHOLDER
                self.device[seq.seq_id, index] = self.sample(seq, index)
            self.in_flight.append(batch)
        if len(self.in_flight) > int(self.overlap) or (batch is None and self.in_flight):
            done = self.in_flight.pop(0)
            tokens = [self.device.pop((seq.seq_id, index)) for seq, index in done.sampled]
            sched.update(done, tokens or None)
        self.check()
        return batch

    def _check_batch(self, batch: ScheduledBatch) -> None:
        sched = self.scheduler
        ids = [s.seq_id for s in batch.seqs]
        assert batch.seqs and len(ids) == len(set(ids))
        assert len(batch.seqs) == len(batch.num_new_tokens)
        assert len(sched.running) + sum(s.pending_forks for s in sched.running) <= sched.max_num_seqs
        assert all(s.status == SequenceStatus.RUNNING and s in sched.running for s in batch.seqs)
        assert not any(s.at_length_limit(sched.max_model_len) for s in batch.seqs)
        if batch.is_decode:
            # prefill work goes first: nothing running had more than its last token to compute
            assert all(s.num_uncomputed_tokens <= 1 for s in sched.running)
        else:
            assert sum(batch.num_new_tokens) <= sched.max_num_batched_tokens
            for seq, n in zip(batch.seqs, batch.num_new_tokens):  # as ModelRunner asserts
                assert PLACEHOLDER not in seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n]

    def _forward(self, batch: ScheduledBatch) -> None:
        """Copies first, then each token's K/V, written only into private blocks."""
        bm, bs = self.bm, self.bm.block_size
        snapshot = [list(self.content[src]) for src, _ in batch.block_copies]
        for (_, dst), data in zip(batch.block_copies, snapshot):
            self.content[dst] = data
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert 1 <= n <= seq.num_uncomputed_tokens
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = bm.blocks[seq.block_table[p // bs]]
                assert block.ref_count == 1, f"seq {seq.seq_id} writes into shared block {block.block_id}"
                self.content[block.block_id][p % bs] = self._values(seq, p + 1)

    def _values(self, seq: Sequence, n: int) -> tuple[int, ...]:
        """seq's first n tokens, placeholders replaced by the values the device already has."""
        return tuple(self.device[seq.seq_id, i] if t == PLACEHOLDER else t for i, t in enumerate(seq.token_ids[:n]))

    def check(self) -> None:
        sched, bm, bs = self.scheduler, self.bm, self.bm.block_size
        live = list(sched.running)
        refs = [0] * bm.num_blocks
        for seq in live:
            assert seq.status == SequenceStatus.RUNNING
            assert len(seq.block_table) >= bm.num_blocks_for(seq.num_computed_tokens)
            assert seq.num_committed_tokens <= seq.num_computed_tokens
            for b in seq.block_table:
                refs[b] += 1
            for p in range(seq.num_computed_tokens):
                assert self.content[seq.block_table[p // bs]][p % bs] == self._values(seq, p + 1)
        for block in bm.blocks:  # a hashed block holds real tokens, never a value not read back yet
            if block.hash != -1:
                assert PLACEHOLDER not in block.token_ids
                assert [c[-1] for c in self.content[block.block_id]] == block.token_ids
        assert [b.ref_count for b in bm.blocks] == refs
        assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}
        for seq in sched.waiting:
            assert seq.status == SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        for seq in self.finished:
            assert seq.block_table == [] and PLACEHOLDER not in seq.token_ids
        assert len(live) + len(sched.waiting) + len(self.finished) == len(self.seqs)
        usage = sched.kv_usage
        assert (usage.slots_allocated, usage.slots_filled) == (self.kv_slots_allocated, self.kv_slots_filled)

    def run(self, max_steps: int = 3000) -> None:
        for _ in range(max_steps):
            if not (self.scheduler.has_work() or self.in_flight):
                break
            self.step()
        assert not self.scheduler.has_work(), "did not finish"
        self.check_done()

    def check_done(self) -> None:
        bm = self.bm
        assert not self.in_flight and not self.device
        assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
        assert all(b.ref_count == 0 for b in bm.blocks)
        for seq in self.seqs:
            assert seq.is_finished and seq.finish_reason == "length"
            assert seq.num_completion_tokens == seq.sampling_params.max_tokens
            # every token is the one sampled for it, whatever was preempted or forked on the way
            assert seq.completion_token_ids == [self.sample(seq, i) for i in range(seq.num_prompt_tokens, seq.num_tokens)]


def test_prefill_is_scheduled_before_decode():
    eng = Driver()
    a = eng.add([1, 2, 3, 4, 5], max_tokens=5)
    batch = eng.step()
    assert not batch.is_decode and batch.seqs == [a] and batch.num_new_tokens == [5]
    assert a.num_tokens == 6 and a.num_uncomputed_tokens == 1
    b = eng.add([6, 7, 8], max_tokens=5)
    batch = eng.step()
    assert not batch.is_decode and batch.seqs == [b]  # a waits while b's prompt runs
    assert a.num_tokens == 6
    batch = eng.step()
    assert batch.is_decode and batch.seqs == [a, b] and batch.num_new_tokens == [1, 1]
    assert a.num_tokens == 7 and b.num_tokens == 5
    eng.run()


def test_chunked_prefill_splits_a_long_prompt():
    eng = Driver(max_num_batched_tokens=4)
    a = eng.add(list(range(10)), max_tokens=2)
    seen = []
    for _ in range(3):
        before = a.num_computed_tokens
        batch = eng.step()
        assert not batch.is_decode and batch.seqs == [a]
        seen.append((before, batch.num_new_tokens[0], a.num_tokens))
    # chunks of 4, 4, 2; only the last one samples (appends a token)
    assert seen == [(0, 4, 10), (4, 4, 10), (8, 2, 11)]
    batch = eng.step()
    assert batch.is_decode
    eng.run()


def test_chunked_prefill_last_chunk_samples():
    eng = Driver(max_num_batched_tokens=3)
    a = eng.add(list(range(7)), max_tokens=1)
    samples = []
    while eng.scheduler.has_work():
        batch = eng.step()
        assert batch.block_copies == []
        samples.append((batch.is_decode, batch.num_new_tokens[0], bool(batch.sampled)))
    # chunks of 3 and 3; the prompt's last token is left to a 1-token (decode) step, which samples
    assert samples == [(False, 3, False), (False, 3, False), (True, 1, True)]
    assert a.is_finished and a.num_tokens == 8 and eng.bm.num_free_blocks == eng.bm.num_blocks
    eng.check_done()


def test_chunked_prefill_shares_the_budget():
    eng = Driver(max_num_batched_tokens=4)
    a = eng.add(list(range(6)), max_tokens=3)
    b = eng.add([9, 9, 9], max_tokens=3)
    batch = eng.step()
    assert batch.seqs == [a] and batch.num_new_tokens == [4]  # the budget is spent: b waits
    assert eng.scheduler.waiting[0] is b
    batch = eng.step()
    assert not batch.is_decode and batch.seqs == [a, b] and batch.num_new_tokens == [2, 2]  # a's chunk first
    eng.run()
    assert all(sum(x.num_new_tokens) <= 4 for x in eng.batches if x is not None)


def test_max_num_seqs_is_respected():
    eng = Driver(max_num_seqs=2)
    seqs = [eng.add([i, i + 1, i + 2], max_tokens=3 + i) for i in range(5)]
    batch = eng.step()
    assert batch.seqs == seqs[:2]
    assert list(eng.scheduler.waiting) == seqs[2:]
    eng.run()
    assert max(len(x.seqs) for x in eng.batches if x is not None) == 2
    assert eng.finished[0] is seqs[0]


def test_max_num_seqs_counts_forked_children():
    eng = Driver(max_num_seqs=4)
    eng.add([1, 2, 3], max_tokens=3, n=3)
    eng.add([4, 5, 6], max_tokens=3, n=2)  # waits: 3 + 2 > 4
    eng.step()
    assert len(eng.scheduler.running) == 3 and len(eng.scheduler.waiting) == 1


def test_decode_preempts_the_latest_arrival_when_the_cache_is_full():
    eng = Driver(num_blocks=6, block_size=2)
    a, b, c = (eng.add([1 + i, 2, 3], max_tokens=4) for i in range(3))
    batch = eng.step()  # prefill: 2 blocks each, the cache is full
    assert batch.seqs == [a, b, c] and eng.bm.num_free_blocks == 0
    d = eng.add([7], max_tokens=1)
    batch = eng.step()  # d does not fit; decode: the 4th token fits in the second block
    assert batch.is_decode and batch.seqs == [a, b, c] and eng.scheduler.num_preemptions == 0
    assert list(eng.scheduler.waiting) == [d]
    c_blocks = list(c.block_table)
    batch = eng.step()  # decode: each needs a third block; c, the latest, makes room
    assert eng.scheduler.num_preemptions == 1
    assert batch.is_decode and batch.seqs == [a, b]
    assert list(eng.scheduler.waiting) == [c, d]  # back at the front, ahead of d
    assert c.status == SequenceStatus.WAITING and c not in eng.scheduler.running
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert set(c_blocks) == {a.block_table[2], b.block_table[2]}  # its blocks went to a and b
    assert c.num_tokens == 5  # its generated tokens are kept, to be recomputed
    eng.run()
    assert eng.scheduler.num_preemptions == 1
    assert c.num_completion_tokens == 4 and d.is_finished


def test_preemption_recomputes_with_prefix_hits_and_finishes():
    eng = Driver(num_blocks=8, block_size=2)
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
    eng = Driver(overlap=True)
    a = eng.add([1, 2, 3], max_tokens=1)
    assert eng.step() is not None  # prefill samples a's only token; read back one step later
    assert eng.step() is None  # a is at its limit: nothing to run, and a is finished now
    assert a.is_finished and not eng.scheduler.has_work()
    eng.run()


def test_block_copies_after_fork_appear_in_the_batch():
    eng = Driver(block_size=4)
    parent = eng.add(list(range(6)), max_tokens=3, n=2)  # blocks: full, 2 of 4
    batch = eng.step()  # prefill; the child forks when the prompt is done
    assert not batch.is_decode and batch.seqs == [parent]
    child = eng.seqs[1]
    assert child.block_table == parent.block_table and child.num_computed_tokens == 5
    assert parent.num_tokens == 7 and parent.num_uncomputed_tokens == 1
    shared = list(parent.block_table)
    assert [eng.bm.blocks[b].ref_count for b in shared] == [2, 2]
    batch = eng.step()
    assert batch.is_decode and batch.seqs == [parent, child]
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
    eng = Driver(block_size=4)
    parent = eng.add(list(range(8)), max_tokens=3, n=3)  # 2 full blocks
    eng.step()
    children = eng.seqs[1:]
    assert len(children) == 2 and all(c.num_computed_tokens == 7 for c in children)
    batch = eng.step()
    # the parent's next token opens a new block; each child rewrites position 7 into its own copy
    assert len(batch.block_copies) == 2
    assert [src for src, _ in batch.block_copies] == [parent.block_table[1]] * 2
    assert len({c.block_table[1] for c in [parent, *children]}) == 3
    assert len({c.block_table[0] for c in [parent, *children]}) == 1
    eng.run()


@settings(max_examples=int(os.environ.get("NANOVLLM_PROPERTY_EXAMPLES", 300)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
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
    eng = Driver(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, overlap)
    capacity = num_blocks * block_size
    for prefix, suffix, max_tokens, n in requests:
        prompt = (base[:prefix] + suffix)[: capacity - 1] or [0]
        eng.add(prompt, min(max_tokens, capacity - len(prompt)), min(n, max_num_seqs))  # as add_request checks
    forks = any(s.pending_forks for s in eng.seqs)
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
                           ("copy-on-write", stats.block_copies), ("idle schedule", eng.num_idle_schedules),
                           ("fork", forks)]:
        if happened:
            event(name)


def test_a_block_is_a_prefix_hit_only_once_its_tokens_are_read_back():
    eng = Driver(block_size=4, overlap=True)
    bm = eng.bm
    prompt = list(range(8))  # 2 full blocks
    a = eng.add(prompt, max_tokens=8)
    eng.step()  # launched and advanced: 8 tokens computed, a placeholder for the 9th; not read back
    assert a.num_computed_tokens == 8 and a.num_committed_tokens == 0 and a.token_ids[-1] == PLACEHOLDER
    probe = Sequence(-1, prompt + [0], SamplingParams())
    assert bm.allocate(probe) and probe.num_computed_tokens == 0  # no hit on blocks still being computed
    bm.free(probe)
    eng.step()  # the next decode is launched, then the prompt's step is read back: its blocks are committed
    assert a.num_committed_tokens == 8 and a.num_computed_tokens == 9
    assert bm.allocate(probe) and probe.num_computed_tokens == 8
    assert probe.block_table[:2] == a.block_table[:2]
    bm.free(probe)
    # the block a's decodes fill (positions 8..11) is not a hit until its last token is read back
    while a.num_committed_tokens < 12:
        probe = Sequence(-1, a.token_ids[:12] + [0], SamplingParams())
        if PLACEHOLDER not in probe.token_ids:
            assert bm.allocate(probe) and probe.num_computed_tokens == 8
            bm.free(probe)
        eng.step()
    probe = Sequence(-1, a.token_ids[:12] + [0], SamplingParams())
    assert bm.allocate(probe) and probe.num_computed_tokens == 12
    bm.free(probe)
    eng.run()


def test_kv_waste_fraction_counts_each_slot_once():
    eng = Driver(block_size=4)
    sched = eng.scheduler
    parent = eng.add(list(range(6)), max_tokens=3, n=2)  # blocks: full, 2 of 4
    eng.step()  # prefill: 8 slots allocated, the prompt's 6 stored once the step has run
    assert (sched.kv_usage.slots_allocated, sched.kv_usage.slots_filled) == (8, 6)
    eng.add([9, 9, 9], max_tokens=3)
    eng.step()  # prefill of the new prompt while parent and child still share the partial block
    # 3 blocks; the shared one holds positions 4 and 5 for both, counted once: 4 + 2 + 3 filled
    assert (sched.kv_usage.slots_allocated, sched.kv_usage.slots_filled) == (8 + 12, 6 + 9)
    for _ in range(3):
        eng.step()  # Driver.check compares every step's counts with its own from the block tables
    usage = sched.kv_usage
    assert usage.waste_fraction == 1 - eng.kv_slots_filled / eng.kv_slots_allocated
    assert 0 < usage.waste_fraction < 1
    eng.run()
    assert parent.is_finished
