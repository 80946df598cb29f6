"""The CUDA graphs' inputs: a step's arrays land where the graphs read them, in one upload."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.attention.metadata import build_layout
from nanovllm.engine.cuda_graph import StaticInputs, graph_batch_sizes
from nanovllm.engine.step_inputs import StepInputs
from nanovllm.engine.uploader import Uploader

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="needs CUDA")])]


def decode_step(seq_lens: list[int], rows: int, seed: int) -> StepInputs:
    """A decode step of len(seq_lens) sequences padded to `rows`, with random block tables."""
    rng = np.random.default_rng(seed)
    tables = [rng.integers(0, 1000, -(-n // 16)).tolist() for n in seq_lens]
    layout = build_layout([1] * len(seq_lens), seq_lens, tables, 16, num_rows=rows, max_seq_len=256)
    ids = np.zeros(rows, np.int64)
    ids[: len(seq_lens)] = rng.integers(0, 5000, len(seq_lens))
    prev = np.full(rows, -1, np.int64)
    prev[0] = 2  # the first row's token is still on the device, row 2 of the last samples
    return StepInputs(ids, prev, np.arange(len(seq_lens)), layout, np.zeros((0, 2), np.int64), True,
                      len(seq_lens), True)


@pytest.mark.parametrize("device", DEVICES)
def test_load_puts_each_array_where_the_graphs_read_it(device):
    inputs = StaticInputs(max_tokens=16, max_rows=16, max_blocks_per_seq=8, device=torch.device(device))
    inputs.block_tables.fill_(-7)  # columns past a step's width keep what they held
    upload = Uploader(torch.device(device))
    for seed, (seq_lens, rows) in enumerate([([5, 40, 100], 4), ([17] * 7 + [3], 8)]):
        step = decode_step(seq_lens, rows, seed)
        rng = np.random.default_rng(seed)
        draw = (rng.random(rows).astype(np.float32), rng.random(rows) < 0.5, rng.integers(0, 2**32, (rows, 2)))
        extra = [np.arange(5) * seed, np.array([1.5, -2.0], np.float32)]
        got = inputs.load(upload, step, draw, extra)
        layout = step.layout
        want = {"input_ids": step.input_ids, "prev_rows": step.prev_rows, "positions": layout.positions,
                "slot_mapping": layout.slot_mapping, "query_start_loc": layout.query_start_loc,
                "seq_lens": layout.seq_lens, "seq_start_loc": layout.seq_start_loc, "inv_t": draw[0],
                "greedy": draw[1], "keys": draw[2]}
        for name, array in want.items():
            view = getattr(inputs, name)[: len(array)]
            np.testing.assert_array_equal(view.cpu().numpy(), array, err_msg=name)
        assert inputs.seq_lens.dtype == torch.int32 and inputs.block_tables.dtype == torch.int32
        width = layout.block_tables.shape[1]
        np.testing.assert_array_equal(inputs.block_tables[:rows, :width].cpu().numpy(), layout.block_tables)
        assert (inputs.block_tables[:, 7] == -7).all()  # wider than either step's tables
        for tensor, array in zip(got, extra):
            np.testing.assert_array_equal(tensor.cpu().numpy(), array)
    inputs.load(upload, decode_step([9], 1, 5), None, [])  # nothing drawn (tensor parallelism)
    assert inputs.seq_lens[0].item() == 9 and inputs.positions[0].item() == 8


def test_verify_step_without_device_tokens_reads_none():
    """A verify step has no rows whose token is on the device: every token's prev_rows is -1."""
    layout = build_layout([3, 2], [10, 20], [[1], [2, 3]], 16, num_rows=2, num_tokens=6, max_query_len=3)
    step = StepInputs(np.arange(6), np.zeros(0, np.int64), np.arange(5), layout, np.zeros((0, 2), np.int64),
                      False, 2, True)
    inputs = StaticInputs(max_tokens=8, max_rows=4, max_blocks_per_seq=4, device=torch.device("cpu"))
    inputs.prev_rows.fill_(3)
    draw = (np.ones(6, np.float32), np.ones(6, np.bool_), np.zeros((6, 2), np.int64))
    inputs.load(Uploader(torch.device("cpu")), step, draw, [])
    assert inputs.prev_rows[:6].tolist() == [-1] * 6


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(512)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(512)[-1] == 512
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
