"""Prompt lookup: the longest n first, the latest earlier occurrence, at most k tokens; the index
grown step by step gives what a search of the whole context would. Proposals keep following the
last match while the sequence does."""
from __future__ import annotations

import numpy as np

from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec_decode.ngram_proposer import NgramIndex, NgramProposer


def follow(index: NgramIndex, tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the index's latest match of the last n tokens (vLLM's prompt lookup)."""
    e = index.latest_match(tokens)
    return [] if e is None else tokens[e + 1 : e + 1 + k]


def lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    return follow(NgramIndex(n_min, n_max), tokens, k)


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
            assert follow(index, tokens[:length].tolist(), k) == expected, (tokens[:length].tolist(), n_min, n_max, k)
            length += int(rng.integers(1, 4))  # a step commits one token or several accepted ones


def test_proposals_follow_the_last_match_while_the_tokens_do():
    tokens = [1, 2, 3, 4, 5, 6, 0, 2, 3, 4, 7, 0, 8, 1, 2]
    index = NgramIndex(2, 3)
    assert index.propose(tokens, 1) == [3]  # "1 2" ended at position 1
    tokens += [3, 4]  # accepted, then the bonus token: still the text at positions 2-3
    assert lookup(tokens, 2, 3, 2) == [7, 0]  # the latest "2 3 4" is the later one
    assert index.propose(tokens, 2) == [5, 6]  # where the sequence has been copying from
    tokens += [5, 9]  # 5 accepted, the bonus token leaves the text: back to the latest match
    assert index.propose(tokens, 2) == lookup(tokens, 2, 3, 2) == []
    tokens += [0, 2]
    assert index.propose(tokens, 3) == lookup(tokens, 2, 3, 3) == [3, 4, 7]


def test_proposals_past_a_token_in_flight_guess_that_every_proposal_is_accepted():
    """A step launched before the last is read back: the tokens end in that step's proposals and a
    placeholder for its bonus token. The match goes on as if every proposal is accepted and the
    placeholder is the text's next token; no unverified token is ever indexed."""
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    tokens = text + [1, 2]
    known = len(tokens)
    index = NgramIndex(2, 3)
    assert index.propose(tokens, 2) == [3, 4]
    tokens += [3, 4, PLACEHOLDER]  # in flight; the placeholder would be 5
    assert index.propose(tokens, 3) == [6, 7, 8]
    assert max(index.latest.values()) < known  # the proposals in flight are not indexed
    tokens[-1] = 5  # read back: all accepted, the bonus as guessed
    tokens += [6, 7, 8, PLACEHOLDER]
    assert index.propose(tokens, 12) == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # known tokens only: up to the placeholder
    # a bonus token other than the guess, followed by fewer proposals than n_min: no match to go on,
    # and the tokens before the placeholder hold a proposal not verified yet: no lookup either
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 5, 8]
    tokens = text + [1, 2]
    index = NgramIndex(2, 3)
    assert index.propose(tokens, 1) == [3]
    tokens += [3, PLACEHOLDER]
    assert index.propose(tokens, 1) == [5]
    tokens[-1] = 0
    tokens += [5, PLACEHOLDER]  # the last two, 0 5, are not the text's 4 5 (though 0 5 occurs there)
    assert index.propose(tokens, 2) == []
    # nothing pending (the last step proposed nothing): the latest match of the known tokens
    tokens[-1] = 7
    tokens += [PLACEHOLDER]  # 5 7 occurs nowhere before: no proposal, and then
    assert index.propose(tokens, 2) == []
    tokens[-1] = 8
    tokens += [PLACEHOLDER]  # "7 8" ended at index 7: the placeholder would be 9, then 0, 5
    assert index.propose(tokens, 2) == [0, 5]


def test_every_proposal_continues_an_earlier_occurrence_of_the_last_tokens():
    """Random texts and acceptances: a proposal is what followed an earlier occurrence of the last
    n_min tokens (as many tokens as followed it, up to k), and there is one whenever lookup has one."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        n_min = int(rng.integers(1, 4))
        index = NgramIndex(n_min, n_min + int(rng.integers(0, 3)))
        tokens = rng.integers(0, 4, int(rng.integers(1, 30))).tolist()
        for _ in range(20):
            k = int(rng.integers(1, 6))
            expected = lookup(tokens, index.n_min, index.n_max, k)
            proposal = index.propose(tokens, k)
            assert bool(proposal) == bool(expected), (tokens, proposal, expected)
            if proposal:
                suffix = tokens[-n_min:]
                assert any(tokens[e - n_min + 1 : e + 1] == suffix and tokens[e + 1 : e + 1 + k] == proposal
                           for e in range(n_min - 1, len(tokens) - 1)), (tokens, proposal)
            accepted = proposal[: int(rng.integers(0, len(proposal) + 1))]
            tokens = tokens + accepted + [int(rng.integers(0, 4))]


def test_proposer_keeps_an_index_per_sequence_until_released():
    proposer = NgramProposer(1, 3)
    a, b = Sequence(1, [1, 2, 3, 1, 2], SamplingParams()), Sequence(2, [4, 5, 4], SamplingParams())
    assert proposer.propose([a, b], [2, 0]) == [[3, 1], []]  # k = 0: no proposal, and no index
    a.token_ids.extend([3, 1])
    assert proposer.propose([a, b], [3, 3]) == [[2, 3, 1], [5, 4]]
    proposer.release(a)
    assert set(proposer.indexes) == {2}
