"""Continuous batching: which sequences run in the next forward, and every transition of a sequence.

The scheduler is the one owner of a sequence's life: it admits (`schedule`),
appends speculative proposals, counts launched tokens and forks (`advance`), takes
sampled tokens back, keeps the accepted proposals and rolls back the rejected ones,
and stops on stop ids, EOS and the length rule (`update`), preempts, aborts and finishes.
The engine, beam search and the tests call these; nothing else moves a sequence.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm.spec_decode.proposer import Proposer

# (sequence, index of its newest token) -> the stop string that token completes, if any
StopStringCheck = Callable[[Sequence, int], "str | None"]


@dataclass
class ScheduledBatch:
    """One forward's work: `num_new_tokens[i]` tokens of `seqs[i]`, from its first uncomputed one."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # (sequence, index of its placeholder token) for each row the sampler fills, set by `advance`
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    # each sequence's num_computed_tokens once this batch has run, set by `advance`
    computed_after: list[int] = field(default_factory=list)
    # each sequence's num_rollbacks when launched, set by `advance`: a later rollback voids its rows
    rollbacks: list[int] = field(default_factory=list)
    # a speculative step: seqs[i] ends in num_proposed[i] proposed tokens, each position sampled
    num_proposed: list[int] | None = None
    # every sequence computes just its last token: the shape a decode CUDA graph runs
    is_decode: bool = field(init=False)
    # positions each sequence samples this step: 0 unless all its tokens are computed after it,
    # else its last token's and one per proposal; fixed when the batch is made
    sample_counts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        counts, decode = [], True
        for i, (seq, n) in enumerate(zip(self.seqs, self.num_new_tokens)):
            done = seq.num_computed_tokens + n == len(seq.token_ids)
            decode = decode and done and n == 1
            counts.append(1 + (self.num_proposed[i] if self.num_proposed is not None else 0) if done else 0)
        self.is_decode, self.sample_counts = decode, counts



@dataclass
class KVUsage:
    """Σ over scheduled steps of KV slots allocated and of slots holding a token (the waste metric).

    Set `timeline` to a list to also record each step's (slots holding a token, slots allocated,
    sequences running): `bench.py --kv-report` draws it.
    """

    slots_allocated: int = 0
    slots_filled: int = 0
    timeline: list[tuple[int, int, int]] | None = None

    @property
    def waste_fraction(self) -> float:
        return 1.0 - self.slots_filled / self.slots_allocated if self.slots_allocated else 0.0


class Scheduler:
    """Prefill first (chunked within the token budget), else one decode step for all running.

    A sequence gets blocks for its whole prompt when admitted. When a decode
    step finds the cache full, the latest arrivals are preempted: their blocks
    are freed and they go back to the front of the queue to be recomputed
    (prefix caching usually finds most of their blocks again).
    """

    def __init__(self, config: Config, block_manager: BlockManager, proposer: Proposer | None = None):
        self.max_model_len = config.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.kv_usage = KVUsage()
        self.proposer = proposer
        self.spec = config.speculative_config if proposer is not None else None
        # proposals verified and accepted; those in a step an earlier rollback voided count as voided
        self.num_proposed_tokens = self.num_accepted_tokens = self.num_voided_tokens = 0
        self._seq_ids = itertools.count()

    # -- admission --------------------------------------------------------------

    def new_sequence(self, token_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        """A sequence with an id of this scheduler (later ids are preempted first), queued to run."""
        seq = Sequence(next(self._seq_ids), token_ids, params, request_id)
        seq.pending_forks = params.n - 1
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next forward's work; None while every running sequence only awaits its last token's value."""
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is not None:
            batch.block_copies = self.block_manager.take_copies()
        return batch

    def _record_kv_usage(self) -> None:
        """Count each used block's filled slots once, however many sequences share it, as they
        stand once a launched step has run (its tokens count as stored).

        A block that some holder has not filled is in that holder's tail: from the block of
        its last computed token on. A block outside every holder's tail is full, and so is a
        tail block that another holder has outside its tail (it holds more references than
        there are tails it is in): only tails are walked, not whole block tables.
        """
        bm = self.block_manager
        bs = bm.block_size
        tails: dict[int, list[int]] = {}  # block id -> [the most slots a holder filled, tails it is in]
        for seq in self.running:
            computed = seq.num_computed_tokens
            for i in range(max(computed - 1, 0) // bs, len(seq.block_table)):
                entry = tails.setdefault(seq.block_table[i], [0, 0])
                entry[0] = max(entry[0], min(max(computed - i * bs, 0), bs))
                entry[1] += 1
        filled_in_tails = sum(bs if bm.blocks[b].ref_count > n else most for b, (most, n) in tails.items())
        used = bm.num_used_blocks
        filled = (used - len(tails)) * bs + filled_in_tails
        self.kv_usage.slots_allocated += used * bs
        self.kv_usage.slots_filled += filled
        if self.kv_usage.timeline is not None:
            self.kv_usage.timeline.append((filled, used * bs, len(self.running)))

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
            if not self.block_manager.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += 1 + seq.pending_forks
            count = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq), counts.append(count)
            budget -= count
        return ScheduledBatch(seqs, counts) if seqs else None

    def speculating(self) -> bool:
        """Whether decode steps speculate now: a proposer, and no more running than disable_by_batch_size."""
        return self.proposer is not None and len(self.running) <= self.spec.disable_by_batch_size

    def overlaps(self) -> bool:
        """Whether the next step may be scheduled while the last one runs: always without speculation;
        with it when the proposer guesses past the tokens in flight (prompt lookup: its match goes on)."""
        return not self.speculating() or self.proposer.guesses_ahead

    def _schedule_decode(self) -> ScheduledBatch | None:
        speculate = self.speculating()
        scheduled: list[Sequence] = []
        lookaheads: list[int] = []
        done: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            if seq.at_length_limit(self.max_model_len):
                done.append(seq)
                continue
            lookahead = self._max_proposals(seq) if speculate else 0
            if lookahead and not self.block_manager.append_slots(seq, lookahead):
                lookahead = 0  # no room for proposals: decode plainly rather than preempt for them
            while not self.block_manager.append_slots(seq):
                victim = max(self.running, key=lambda s: s.seq_id, default=None)
                if victim is None or victim.seq_id < seq.seq_id:
                    self.preempt(seq)
                    break
                self.running.remove(victim)
                self.preempt(victim)
            else:
                scheduled.append(seq)
                lookaheads.append(lookahead)
        self.running.extend(scheduled)
        self.running.extend(done)
        if not scheduled:
            assert done, "no sequence fits in the KV cache; add_request should have refused it"
            return None
        num_proposed = self._propose(scheduled, lookaheads) if speculate else None
        return ScheduledBatch(scheduled, [1 + (num_proposed[i] if speculate else 0) for i in range(len(scheduled))],
                              num_proposed=num_proposed)

    def _max_proposals(self, seq: Sequence) -> int:
        """k, or fewer where the step's tokens would pass max_tokens or the context; none while the
        last token's value is still on the device (an overlapped step) unless the proposer guesses it."""
        if seq.token_ids[-1] == PLACEHOLDER and not self.proposer.guesses_ahead:
            return 0
        left = min(seq.sampling_params.max_tokens - seq.num_completion_tokens, self.max_model_len - seq.num_tokens)
        return max(min(self.spec.num_speculative_tokens, left - 1), 0)

    def _propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[int]:
        """Append each sequence's proposals (its slots are reserved) as uncomputed tokens; their counts."""
        proposals = self.proposer.propose(seqs, max_lens)
        for seq, tokens, k in zip(seqs, proposals, max_lens):
            seq.token_ids.extend(tokens[:k])
        return [min(len(tokens), k) for tokens, k in zip(proposals, max_lens)]

    # -- stepping ---------------------------------------------------------------

    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """The batch is on the device: count its tokens as computed, give each sampling
        sequence a placeholder for its next token, and fork n > 1 parents whose prompt is
        now computed. Returns the new children."""
        children: list[Sequence] = []
        computed_after, sampled = batch.computed_after, batch.sampled
        for seq, n, num_sampled in zip(batch.seqs, batch.num_new_tokens, batch.sample_counts):
            seq.num_computed_tokens += n
            computed_after.append(seq.num_computed_tokens)
            batch.rollbacks.append(seq.num_rollbacks)
            if num_sampled:
                if seq.pending_forks:
                    children += self.fork(seq, seq.pending_forks, recompute_last=True)
                    seq.pending_forks = 0  # a parent recomputed after preemption does not fork again
                seq.token_ids.append(PLACEHOLDER)
                end = len(seq.token_ids)
                if num_sampled == 1:
                    sampled.append((seq, end - 1))
                else:
                    sampled += [(seq, index) for index in range(end - num_sampled, end)]
        self._record_kv_usage()
        return children

    def fork(self, parent: Sequence, n: int, recompute_last: bool = False,
             last_tokens: list[int] | None = None) -> list[Sequence]:
        """n running children sharing all of parent's blocks (copy-on-write on their first write).

        With `recompute_last` each child recomputes the parent's last token as a 1-token
        decode step and so samples its own next token (n > 1 sampling). Child i draws
        with seed + i when the parent is seeded, so the samples differ reproducibly.
        `last_tokens[i]` replaces child i's last token, which must be uncomputed (beam search).
        """
        children = []
        for i in range(1, n + 1):
            child = Sequence(next(self._seq_ids), parent.token_ids, parent.sampling_params, parent.request_id)
            child.num_prompt_tokens = parent.num_prompt_tokens
            if parent.sample_seed is not None:
                child.sample_seed = parent.sample_seed + i
            self.block_manager.fork(parent, child)
            if recompute_last:
                child.num_computed_tokens = child.num_tokens - 1
                child.num_committed_tokens = min(child.num_committed_tokens, child.num_computed_tokens)
            if last_tokens is not None:
                assert child.num_computed_tokens < child.num_tokens, "only an uncomputed token may change"
                child.token_ids[-1] = last_tokens[i - 1]
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            children.append(child)
        return children

    def update(self, batch: ScheduledBatch, token_ids: list[int] | None,
               stop_string: StopStringCheck | None = None) -> list[tuple[int, Sequence, int]]:
        """Take a launched batch's sampled tokens back (row i fills `batch.sampled[i]`).

        A speculative step first keeps each sequence's accepted proposals and rolls
        back the rest (`_accept`). Then commits the tokens the batch computed (their
        blocks become prefix-cache hits) and, token by token, finishes sequences on a
        stop token id or EOS, then on a stop string (`stop_string(seq, index)`, the
        engine's detokenizer), then on the length rule. Returns (row, sequence, token
        index) for every token a sequence got; a sequence that finished at an earlier
        token (under overlap, or earlier in its accepted run) gets none after it, and
        neither does one rolled back since the batch was launched (its rows are void).
        """
        void = {seq.seq_id for seq, n in zip(batch.seqs, batch.rollbacks) if seq.num_rollbacks != n}
        if batch.num_proposed is not None and token_ids is not None:
            self._accept(batch, token_ids, void)
        bs = self.block_manager.block_size
        for seq, computed in zip(batch.seqs, batch.computed_after):
            if seq.status == SequenceStatus.RUNNING and seq.block_table and seq.seq_id not in void:
                before = seq.num_committed_tokens
                seq.num_committed_tokens = max(before, min(computed, seq.num_computed_tokens))
                if seq.num_committed_tokens // bs > before // bs:  # a block filled: hash it
                    self.block_manager.commit(seq)
        if token_ids is None:
            return []
        live = []
        for row, (seq, index) in enumerate(batch.sampled):
            if seq.is_finished or index >= seq.num_tokens or seq.seq_id in void:  # or a rejected proposal's row
                continue
            seq.token_ids[index] = token_ids[row]
            live.append((row, seq, index))
            self._check_stop(seq, index, stop_string)
        return live

    def _accept(self, batch: ScheduledBatch, token_ids: list[int], void: set[int]) -> None:
        """Speculative rollback, its one owner: keep each sequence's proposals up to the first the
        target's sample there disagrees with (greedy: its argmax; sampling: its draw, which
        equals the proposal with probability p(proposal)), plus the target's token at that
        position; drop the rejected proposals' tokens, computed count and blocks.

        A step launched after this one (overlapped: its proposer guessed that every proposal here
        is accepted) computed tokens past a rejection: the rollback cuts them too and voids its
        rows for the sequence (`num_rollbacks`). A sequence preempted since keeps only its tokens."""
        row = 0
        for seq, num_proposed in zip(batch.seqs, batch.num_proposed):  # a decode batch: every sequence samples
            samples = token_ids[row : row + num_proposed + 1]
            first = batch.sampled[row][1]  # index of the first proposal (or the placeholder)
            row += len(samples)
            if seq.is_finished:
                continue
            if seq.seq_id in void:
                self.num_voided_tokens += num_proposed
                continue
            accepted = 0
            while accepted < num_proposed and samples[accepted] == seq.token_ids[first + accepted]:
                accepted += 1
            self.num_proposed_tokens += num_proposed
            self.num_accepted_tokens += accepted
            running = seq.status == SequenceStatus.RUNNING
            if accepted < num_proposed:
                del seq.token_ids[first + accepted + 1 :]
                seq.num_rollbacks += 1
                if running:
                    seq.num_computed_tokens = first + accepted
            if running:
                self.block_manager.free_tail(seq)

    def _check_stop(self, seq: Sequence, index: int, stop_string: StopStringCheck | None) -> None:
        params, token = seq.sampling_params, seq.token_ids[index]
        if token in params.stop_token_ids:
            self.finish(seq, "stop", token, index + 1)
        elif not params.ignore_eos and token in self.config.eos_token_ids:
            self.finish(seq, "stop", None, index + 1)
        elif stop_string is not None and (stop := stop_string(seq, index)) is not None:
            self.finish(seq, "stop", stop, index + 1)
        elif index + 1 - seq.num_prompt_tokens >= params.max_tokens or index + 1 >= self.max_model_len:
            self.finish(seq, "length", None, index + 1)

    # -- leaving ----------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line, to be recomputed."""
        self.block_manager.free(seq)
        if self.proposer is not None:
            self.proposer.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
               num_tokens: int | None = None) -> None:
        """End seq (it may have been preempted since): free its blocks at once and keep its
        first `num_tokens` tokens (a later token may already be in flight)."""
        if seq.is_finished:
            return
        queue = self.running if seq.status == SequenceStatus.RUNNING else self.waiting
        queue.remove(seq)
        self.block_manager.free(seq)
        if self.proposer is not None:
            self.proposer.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:  # aborted with a token in flight
            seq.token_ids.pop()
