"""Prompt-lookup proposals: what followed the sequence's last n tokens where they occurred before."""
from __future__ import annotations

from nanovllm.engine.sequence import PLACEHOLDER, Sequence


class NgramIndex:
    """One sequence's n-grams (n_min <= n <= n_max) mapped to the position where each ended last.

    A search for the latest match first indexes the n-grams that end at the positions it has not
    seen, up to the one before the last token (an earlier occurrence never ends at the last token
    itself), then finds the last n tokens in one dict probe per n. A 2k-token prompt is indexed once, by zip
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
        self.match: tuple[int, int] | None = None  # (where the last proposal's match ended, len(tokens) then)
        self.num_pending = 0  # the last call's proposals: not verified yet while a placeholder follows them

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens: the continuation of the last proposal's match where the tokens since
        then followed it (its last n_min tokens agree, which after a rejection they cannot: the
        target's token there differs from the proposal's), else what followed `latest_match`.

        A sequence that copies a text, or repeats itself, keeps one alignment with its earlier
        tokens; the latest occurrence of its last n-gram is often elsewhere when that n-gram
        recurs with other continuations. On the default model's `bench.py --workload repeat`
        outputs (greedy, 4 prompts x 500 tokens, replayed without the model) this took k=4 from
        2.92 to 3.27 tokens per verify step (68 to 85 % of proposals accepted), k=8 from 4.07 to
        4.36. The bench itself on CPU (batch 1, k=4, 300 tokens, seeds 1 and 2): 109 -> 97 and
        117 -> 98 decode steps, 64 -> 78 % and 56 -> 79 % accepted.
        """
        if tokens[-1] == PLACEHOLDER:
            return self._propose_ahead(tokens, k)
        e = None
        if self.match is not None:
            aligned = self.match[0] + len(tokens) - self.match[1]
            if aligned < len(tokens) - 1 and tokens[aligned - self.n_min + 1 : aligned + 1] == tokens[-self.n_min:]:
                e = aligned
        if e is None:
            e = self.latest_match(tokens)
        return self._take(tokens, e, len(tokens), k)

    def _propose_ahead(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens to follow the last one, still on the device, in a step launched before the
        one computing it is read back: the match's continuation, as if all its proposals (which
        precede the placeholder) are accepted and the placeholder is the token that follows them
        there; proposing goes on at the device's pace. Only when the last call proposed nothing
        (every token before the placeholder is known) is the latest match of those tokens looked
        up. A wrong guess costs the step: its rows are void when the rollback reaches them."""
        last = len(tokens) - 1  # the placeholder's index
        e = None
        if self.match is not None:
            aligned = self.match[0] + len(tokens) - self.match[1]  # where the placeholder's token would come from
            if aligned < last and tokens[aligned - self.n_min : aligned] == tokens[last - self.n_min : last]:
                e = aligned
        if e is None and not self.num_pending:
            before = self.latest_match(tokens, last)
            e = before + 1 if before is not None and before + 1 < last else None
        return self._take(tokens, e, last, k)

    def _take(self, tokens: list[int], e: int | None, end: int, k: int) -> list[int]:
        """The up to k known tokens (before index `end`) after a match ending at e, appended at
        len(tokens); remembered as the match to continue."""
        self.match = None if e is None else (e, len(tokens))
        proposals = [] if e is None else tokens[e + 1 : min(e + 1 + k, end)]
        self.num_pending = len(proposals)
        return proposals

    def latest_match(self, tokens: list[int], length: int | None = None) -> int | None:
        """Where the latest earlier occurrence of the last n of the first `length` tokens (default:
        all) ends, the longest n first (vLLM's prompt lookup, preferring the most recent match)."""
        end = (len(tokens) if length is None else length) - 1
        assert end >= self.indexed, "tokens only grow between lookups"
        for n in range(self.n_min, self.n_max + 1):  # the n-grams ending at indexed..end-1, in C loops
            first = max(self.indexed, n - 1)  # the first of those positions that ends a whole n-gram
            grams = zip(*(tokens[first - n + 1 + i : end - n + 1 + i] for i in range(n)))
            self.latest.update(zip(grams, range(first, end)))  # in order: the latest position wins
        self.indexed = end
        for n in range(min(self.n_max, end), self.n_min - 1, -1):
            e = self.latest.get(tuple(tokens[end + 1 - n : end + 1]))
            if e is not None:
                return e
        return None


class NgramProposer:
    guesses_ahead = True

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.indexes: dict[int, NgramIndex] = {}  # by seq_id

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        proposals = []
        for seq, k in zip(seqs, max_lens):
            if k and seq.seq_id not in self.indexes:
                self.indexes[seq.seq_id] = NgramIndex(self.n_min, self.n_max)
            proposals.append(self.indexes[seq.seq_id].propose(seq.token_ids, k) if k else [])
        return proposals

    def release(self, seq: Sequence) -> None:
        """Forget seq's index (it finished or was preempted)."""
        self.indexes.pop(seq.seq_id, None)
