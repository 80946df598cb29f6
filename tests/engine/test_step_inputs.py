"""StepInputs travel to tensor-parallel workers as one packed int64 message and come back whole."""
from __future__ import annotations

import numpy as np

from nanovllm.attention.metadata import build_layout
from nanovllm.engine.step_inputs import StepInputs


def test_pack_unpack_round_trip():
    layout = build_layout([1, 1], [17, 5], [[3, 4], [7]], 16, num_rows=4, table_width=8, max_seq_len=256)
    step = StepInputs(np.array([11, 12, 0, 0]), np.array([1, -1, -1, -1]), np.array([0, 1]), layout,
                      np.array([[4, 9], [7, 2]]), is_decode=True, num_seqs=2, graphed=True, vocab_parallel=True)
    back = StepInputs.unpack(step.pack())
    assert (back.is_decode, back.num_seqs, back.graphed, back.vocab_parallel) == (True, 2, True, True)
    for name in ("input_ids", "prev_rows", "logit_rows", "block_copies"):
        assert np.array_equal(getattr(back, name), getattr(step, name)), name
    assert (back.layout.max_query_len, back.layout.max_seq_len, back.layout.has_prefix) == (1, 256, True)
    for ours, theirs in zip(back.layout.arrays(), layout.arrays()):
        assert np.array_equal(ours, theirs) and ours.shape == theirs.shape


def test_prefill_without_copies_round_trips():
    layout = build_layout([5], [5], [[0]], 16)
    step = StepInputs(np.arange(5), np.zeros(0, np.int64), np.array([4]), layout, np.zeros((0, 2), np.int64),
                      is_decode=False, num_seqs=1, graphed=False)
    back = StepInputs.unpack(step.pack())
    assert back.block_copies.shape == (0, 2) and back.prev_rows.shape == (0,) and not back.layout.has_prefix
    assert not back.vocab_parallel
    assert np.array_equal(back.input_ids, step.input_ids)
