"""Prompt-lookup proposals: what followed the sequence's last n tokens the latest time they occurred."""
from __future__ import annotations

import numpy as np

from nanovllm.engine.sequence import Sequence


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, trying the
    longest n first (vLLM's prompt lookup, preferring the most recent match).

    One pass finds where the last token occurred before; only those candidates are extended
    backwards, so a 2k-token context costs tens of microseconds rather than a comparison of
    every n-gram for every n (it runs on the host, in step with every speculative decode step).
    """
    n_top = min(n_max, len(tokens) - 1)
    if n_top < n_min:
        return []
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where an earlier match would end
    matched = np.ones(len(ends), dtype=np.int64)  # how many of the last tokens match there
    alive = np.ones(len(ends), dtype=bool)
    for back in range(1, n_top):
        alive &= ends >= back
        alive[alive] = tokens[ends[alive] - back] == tokens[-1 - back]
        matched += alive
    for n in range(n_top, n_min - 1, -1):
        hits = ends[matched >= n]
        if hits.size:
            start = int(hits[-1]) + 1
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        return [ngram_lookup(np.asarray(seq.token_ids, dtype=np.int64), self.n_min, self.n_max, k) if k else []
                for seq, k in zip(seqs, max_lens)]

    def release(self, seq: Sequence) -> None:
        """Nothing to forget: proposals come from the sequence's own tokens."""
