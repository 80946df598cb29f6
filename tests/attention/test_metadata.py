"""The batch layout's host arrays: what attention and the decode grid read."""
import numpy as np

from nanovllm.attention.metadata import build_layout


def test_seq_order_is_longest_first_with_ties_in_row_order_and_padding_last():
    layout = build_layout([1, 1, 1, 1], [5, 40, 5, 17], [[0], [1, 2, 3], [4], [5, 6]], 16, num_rows=6)
    assert layout.seq_lens.tolist() == [5, 40, 5, 17, 0, 0]
    assert layout.seq_order.tolist() == [1, 3, 0, 2, 4, 5]
    assert sorted(layout.seq_order.tolist()) == list(range(6))
    assert len(layout.arrays()) == 7 and layout.arrays()[-1] is layout.seq_order


def test_seq_order_follows_lengths_not_query_tokens():
    """A verify or prefill row's length counts its cached prefix and its new tokens alike."""
    layout = build_layout([3, 1, 8], [10, 30, 8], [[0], [1, 2], [3]], 16)
    assert np.array_equal(layout.seq_order, [1, 0, 2])
