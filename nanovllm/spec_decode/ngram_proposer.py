"""Prompt-lookup proposals: what followed the sequence's last n tokens the latest time they occurred."""
from __future__ import annotations

from nanovllm.engine.sequence import Sequence


class NgramIndex:
    """One sequence's n-grams (n_min <= n <= n_max) mapped to the position where each ended last.

    `lookup` first indexes the n-grams that end at the positions it has not seen, up to the
    one before the last token (an earlier occurrence never ends at the last token itself), then
    finds the last n tokens in one dict probe per n. A 2k-token prompt is indexed once, by zip
    and dict.update per n (0.9 against 2.4 ms for a loop per position on a 2-core CPU; a batch of
    16 such prompts pays it in its first speculative step). After that a step costs a few
    microseconds for the few new tokens, where searching the whole context again (one numpy pass
    per step and sequence) measured ~0.15 ms per sequence per step on the device's host, serial
    with every speculative step. The tokens only grow between lookups: rejected proposals are
    rolled back before the next one and were never indexed; a sequence that is preempted or
    finishes is released and indexed afresh.
    """

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last n tokens, the
        longest n first (vLLM's prompt lookup, preferring the most recent match)."""
        end = len(tokens) - 1
        assert end >= self.indexed, "tokens only grow between lookups"
        for n in range(self.n_min, self.n_max + 1):  # the n-grams ending at indexed..end-1, in C loops
            first = max(self.indexed, n - 1)  # the first of those positions that ends a whole n-gram
            grams = zip(*(tokens[first - n + 1 + i : end - n + 1 + i] for i in range(n)))
            self.latest.update(zip(grams, range(first, end)))  # in order: the latest position wins
        self.indexed = end
        for n in range(min(self.n_max, end), self.n_min - 1, -1):
            e = self.latest.get(tuple(tokens[-n:]))
            if e is not None:
                return tokens[e + 1 : e + 1 + k]
        return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.indexes: dict[int, NgramIndex] = {}  # by seq_id

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        proposals = []
        for seq, k in zip(seqs, max_lens):
            if k and seq.seq_id not in self.indexes:
                self.indexes[seq.seq_id] = NgramIndex(self.n_min, self.n_max)
            proposals.append(self.indexes[seq.seq_id].lookup(seq.token_ids, k) if k else [])
        return proposals

    def release(self, seq: Sequence) -> None:
        """Forget seq's index (it finished or was preempted)."""
        self.indexes.pop(seq.seq_id, None)
