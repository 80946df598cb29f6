"""Arrival counters of last-to-arrive reductions (the kernels that use them test the reductions)."""
from __future__ import annotations

import torch

from nanovllm.utils import arrival
from nanovllm.utils.arrival import arrival_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_arrival_counters_grow_into_new_zeroed_buffers_and_keep_the_old():
    """A CUDA graph keeps the counters' address it captured, so a larger grid gets a new buffer."""
    device = torch.device(DEVICE)
    first = arrival_counters(device, 1)
    assert arrival_counters(device, first.numel()) is first
    grown = arrival_counters(device, first.numel() + 1)
    assert grown.numel() >= 2 * first.numel() and grown.dtype == torch.int32 and not grown.any()
    assert arrival_counters(device, 1) is grown
    assert any(held is first for held in arrival._COUNTERS[device])
