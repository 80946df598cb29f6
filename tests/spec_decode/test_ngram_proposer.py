"""Prompt lookup: the longest n first, the latest earlier occurrence, at most k tokens."""
from __future__ import annotations

import numpy as np

from nanovllm.spec_decode.ngram_proposer import ngram_lookup


def lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    return ngram_lookup(np.asarray(tokens), n_min, n_max, k)


def test_ngram_lookup():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], 1, 3, 2) == [7, 8]  # latest "2 3" is followed by 7 8
    assert lookup([1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3], 1, 3, 2) == [9, 5]  # "1 2 3" (n = 3) beats "2 3"
    assert lookup([1, 2, 3, 4, 3], 1, 2, 5) == [4, 3]  # fewer than k tokens follow
    assert lookup([1, 2, 3, 4], 1, 3, 2) == []  # no earlier occurrence
    assert lookup([5, 6, 5, 6], 3, 3, 2) == []  # only shorter n-grams match
    assert lookup([7], 1, 3, 2) == []


def sliding_window_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """The definition, spelled out: compare every n-gram, longest n first, latest occurrence."""
    from numpy.lib.stride_tricks import sliding_window_view

    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        hits = np.flatnonzero((sliding_window_view(tokens[:-1], n) == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


def test_ngram_lookup_equals_the_definition_on_random_texts():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40)))  # few symbols: many matches
        n_min = int(rng.integers(1, 4))
        n_max, k = n_min + int(rng.integers(0, 4)), int(rng.integers(1, 6))
        assert ngram_lookup(tokens, n_min, n_max, k) == sliding_window_lookup(tokens, n_min, n_max, k), \
            (tokens.tolist(), n_min, n_max, k)
