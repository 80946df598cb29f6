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
