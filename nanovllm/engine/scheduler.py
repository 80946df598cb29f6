"""Continuous batching: which sequences run in the next forward, and how many tokens each."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One forward's work: `num_new_tokens[i]` tokens of `seqs[i]`, from its first uncomputed one."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    is_prefill: bool
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # (sequence, index of its placeholder token) for each row the sampler fills, set at launch
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)

    def samples(self, i: int) -> bool:
        """Whether seqs[i] has all its tokens computed after this step, so it samples the next."""
        seq = self.seqs[i]
        return seq.num_cached_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    """Prefill first (chunked within the token budget), else one decode step for all running.

    A sequence gets blocks for its whole prompt when admitted. When a decode
    step finds the cache full, the latest arrivals are preempted: their blocks
    are freed and they go back to the front of the queue to be recomputed
    (prefix caching usually finds most of their blocks again).
    """

    def __init__(self, config: Config, block_manager: BlockManager):
        self.max_model_len = config.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next forward's work; None while every running sequence only awaits its last token's value."""
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is not None:
            batch.block_copies = self.block_manager.take_copies()
        return batch

    def _at_length_limit(self, seq: Sequence) -> bool:
        """seq has all the tokens it may have; it finishes once their values are read."""
        return (seq.num_completion_tokens >= seq.sampling_params.max_tokens
                or seq.num_tokens >= self.max_model_len)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        for seq in self.running:  # prompts whose earlier chunks already ran
            if seq.num_uncomputed_tokens > 1 and budget > 0:
                count = min(seq.num_uncomputed_tokens, budget)
                seqs.append(seq), counts.append(count)
                budget -= count
        # a request with n > 1 brings its forks with it
        num_seqs = len(self.running) + sum(seq.pending_forks for seq in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seqs + 1 + seq.pending_forks > self.max_num_seqs:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += 1 + seq.pending_forks
            count = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq), counts.append(count)
            budget -= count
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        done: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            if self._at_length_limit(seq):
                done.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                victim = max(self.running, key=lambda s: s.seq_id, default=None)
                if victim is None or victim.seq_id < seq.seq_id:
                    self.preempt(seq)
                    break
                self.running.remove(victim)
                self.preempt(victim)
            else:
                self.block_manager.append_slots(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        self.running.extend(done)
        if not scheduled:
            assert done, "no sequence fits in the KV cache; add_request should have refused it"
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line, to be recomputed."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Free a finished sequence (it may have been preempted since its last token was sampled)."""
        queue = self.running if seq.status == SequenceStatus.RUNNING else self.waiting
        queue.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
