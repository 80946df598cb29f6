"""Speculative rollback in the Scheduler and BlockManager, with no model: 1,000 random rounds of
reserve slots / propose / accept some / reject the rest, with preemption, prefix hits and aborts,
one step at a time or overlapped (each step launched before the last is read back, proposing past
the tokens in flight, as with prompt lookup on a GPU).

A fake KV cache holds, per slot, the tokens up to and including that position (what a K/V
entry depends on), written exactly where a forward would write; after every round every
running sequence must read back its own computed tokens, ref counts must equal the block
tables' references, and the free list must be exactly the unreferenced blocks.
"""
from __future__ import annotations

import random

import pytest

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.sampling_params import SamplingParams

VOCAB = 3  # tiny, so that proposals, accepted tokens and prefix hits are common


class RandomProposer:
    """Proposes random tokens, so the target accepts some and rejects the rest."""

    guesses_ahead = True

    def __init__(self, rng: random.Random):
        self.rng = rng

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        return [[self.rng.randrange(VOCAB) for _ in range(self.rng.randint(0, k))] for k in max_lens]

    def release(self, seq: Sequence) -> None:
        pass


class FakeKV:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.content = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def run(self, batch: ScheduledBatch, on_device: dict[int, int]) -> None:
        """What the forward writes: block copies first, then each scheduled token's entry. A token
        still on the device (a placeholder) is read there: `on_device[seq_id]`."""
        snapshot = [list(self.content[src]) for src, _ in batch.block_copies]
        for (_, dst), data in zip(batch.block_copies, snapshot):
            self.content[dst] = data
        bs = self.bm.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            tokens = list(seq.token_ids)
            if tokens[seq.num_computed_tokens] == PLACEHOLDER:
                tokens[seq.num_computed_tokens] = on_device[seq.seq_id]
            assert PLACEHOLDER not in tokens[: seq.num_computed_tokens + n]
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = seq.block_table[p // bs]
                assert self.bm.blocks[block].ref_count == 1, "a write into a shared block"
                self.content[block][p % bs] = tuple(tokens[: p + 1])

    def check(self, scheduler: Scheduler, reserved: int = 0) -> None:
        """`reserved`: the slots a step in flight may hold past a sequence's tokens (its proposals' room)."""
        bm, bs = self.bm, self.bm.block_size
        refs = [0] * bm.num_blocks
        for seq in scheduler.running:
            # no block past the tokens (a rejected proposal's is freed); the newest token's may come later
            num_blocks = len(seq.block_table)
            most = bm.num_blocks_for(seq.num_tokens + reserved)
            assert bm.num_blocks_for(seq.num_computed_tokens) <= num_blocks <= most
            assert seq.num_committed_tokens <= seq.num_computed_tokens <= seq.num_tokens
            for block in seq.block_table:
                refs[block] += 1
            for p in range(seq.num_computed_tokens):
                assert self.content[seq.block_table[p // bs]][p % bs] == tuple(seq.token_ids[: p + 1])
            for i in range(seq.num_committed_tokens // bs):
                block = bm.blocks[seq.block_table[i]]
                assert block.hash == -1 or block.token_ids == seq.token_ids[i * bs : (i + 1) * bs]
        for seq in scheduler.waiting:  # preempted (maybe with a step in flight, verified since): recomputed later
            assert not seq.block_table and seq.num_computed_tokens == 0
        assert [b.ref_count for b in bm.blocks] == refs
        assert set(bm.free_block_ids) == {i for i, r in enumerate(refs) if r == 0}


def sample(batch: ScheduledBatch, rng: random.Random, on_device: dict[int, int]) -> list[int]:
    """The target's tokens, fixed when the batch launches: it agrees with a proposal (not the
    placeholder) half the time. Each sequence's last one stays on the device for the next step."""
    sampled = []
    for seq, index in batch.sampled:
        agree = index < seq.num_tokens - 1 and rng.random() < 0.5
        sampled.append(seq.token_ids[index] if agree else rng.randrange(VOCAB))
        on_device[seq.seq_id] = sampled[-1]
    return sampled


@pytest.mark.parametrize("overlap", [False, True])
def test_random_speculative_rounds_leak_nothing(tiny_model, overlap):
    path, _ = tiny_model("qwen3")
    rng = random.Random(0)
    config = Config.from_engine_args(path, device="cpu", max_num_seqs=4, max_num_batched_tokens=12,
                                     speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    bm = BlockManager(num_blocks=20, block_size=4)
    scheduler = Scheduler(config, bm, RandomProposer(rng))
    kv = FakeKV(bm)
    base = [rng.randrange(VOCAB) for _ in range(12)]
    rounds = 0
    on_device: dict[int, int] = {}
    in_flight = None
    while rounds < 1000:
        if len(scheduler.waiting) + len(scheduler.running) < 5 and rng.random() < 0.3:
            prompt = base[: rng.randint(0, 12)] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            scheduler.new_sequence(prompt, SamplingParams(max_tokens=rng.randint(1, 40 - len(prompt)), ignore_eos=True))
        if scheduler.running and rng.random() < 0.02:
            scheduler.finish(rng.choice(list(scheduler.running)), "abort")
        batch = scheduler.schedule() if scheduler.has_work() else None
        launched = None
        if batch is not None:
            rounds += 1
            kv.run(batch, on_device)
            scheduler.advance(batch)
            launched = (batch, sample(batch, rng, on_device))
        if in_flight is not None:
            scheduler.update(*in_flight)
            kv.check(scheduler, reserved=4 if launched is not None else 0)
        in_flight = launched
        if not overlap and in_flight is not None:
            scheduler.update(*in_flight)
            kv.check(scheduler)
            in_flight = None
    if in_flight is not None:
        scheduler.update(*in_flight)
    while scheduler.has_work():
        batch = scheduler.schedule()
        if batch is not None:
            kv.run(batch, on_device)
            scheduler.advance(batch)
            scheduler.update(batch, sample(batch, rng, on_device))
            kv.check(scheduler)
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert scheduler.num_accepted_tokens > 100 and scheduler.num_proposed_tokens - scheduler.num_accepted_tokens > 100
    assert scheduler.num_preemptions > 0 and bm.stats.prefix_hit_tokens > 0
    assert (scheduler.num_voided_tokens > 100) == overlap
