"""Prompt-lookup proposals: what followed the sequence's last n tokens the latest time they occurred."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nanovllm.engine.sequence import Sequence


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens, trying the
    longest n first (vLLM's prompt lookup, preferring the most recent match)."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        windows = sliding_window_view(tokens[:-1], n)  # every n-gram that has a token after it
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
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
