"""Prompt lookup: the longest n first, the latest earlier occurrence, at most k tokens; the index
grown step by step gives what a search of the whole context would."""
from __future__ import annotations

import numpy as np

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec_decode.ngram_proposer import NgramIndex, NgramProposer


def lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    return NgramIndex(n_min, n_max).lookup(tokens, k)


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


def test_growing_index_equals_the_definition_on_random_texts():
    """One index per text, looked up after each token as it grows (the steps of a sequence),
    against a search of the whole context each time."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40)))  # few symbols: many matches
        n_min = int(rng.integers(1, 4))
        n_max, k = n_min + int(rng.integers(0, 4)), int(rng.integers(1, 6))
        index = NgramIndex(n_min, n_max)
        length = 1
        while length <= len(tokens):
            expected = sliding_window_lookup(tokens[:length], n_min, n_max, k)
            assert index.lookup(tokens[:length].tolist(), k) == expected, (tokens[:length].tolist(), n_min, n_max, k)
            length += int(rng.integers(1, 4))  # a step commits one token or several accepted ones


def test_proposer_keeps_an_index_per_sequence_until_released():
    proposer = NgramProposer(1, 3)
    a, b = Sequence(1, [1, 2, 3, 1, 2], SamplingParams()), Sequence(2, [4, 5, 4], SamplingParams())
    assert proposer.propose([a, b], [2, 0]) == [[3, 1], []]  # k = 0: no proposal, and no index
    a.token_ids.extend([3, 1])
    assert proposer.propose([a, b], [3, 3]) == [[2, 3, 1], [5, 4]]
    proposer.release(a)
    assert set(proposer.indexes) == {2}
