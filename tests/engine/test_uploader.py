"""Packing a step's host arrays into one buffer and viewing them back (the CUDA upload path's logic)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.engine.uploader import Uploader, byte_offsets, unpack


def step_like_arrays() -> list[np.ndarray]:
    """Mixed dtypes and shapes as a step uploads them, plus an empty array and a dtype outside the table."""
    rng = np.random.default_rng(0)
    return [rng.integers(-5, 10**12, 7), rng.integers(0, 9, (3, 5)).astype(np.int32), rng.random(4).astype(np.float32),
            rng.random(3), rng.random(6) < 0.5, np.zeros(0, np.int64), rng.integers(0, 99, (2, 2)),
            rng.integers(-3, 3, 5).astype(np.int16)]


def assert_same(tensors: list[torch.Tensor], arrays: list[np.ndarray]) -> None:
    assert len(tensors) == len(arrays)
    for t, a in zip(tensors, arrays):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.cpu().numpy(), a)


def test_unpack_views_each_array_at_its_aligned_offset():
    arrays = step_like_arrays()
    offsets, total = byte_offsets(arrays)
    assert all(o % 16 == 0 for o in offsets) and total >= sum(a.nbytes for a in arrays)
    buffer = np.full(total, 0xAB, np.uint8)  # padding bytes are not zero
    for a, o in zip(arrays, offsets):
        buffer[o : o + a.nbytes] = a.view(np.uint8).ravel()
    assert_same(unpack(torch.from_numpy(buffer), arrays, offsets), arrays)


def test_cpu_upload_wraps_without_copy():
    arrays = step_like_arrays()
    tensors = Uploader(torch.device("cpu"))(arrays)
    assert_same(tensors, arrays)
    assert tensors[0].data_ptr() == arrays[0].__array_interface__["data"][0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_upload_round_trips_through_the_ring():
    """More calls than the ring has buffers: every result keeps its own values."""
    upload = Uploader(torch.device("cuda"))
    results = []
    for i in range(9):
        arrays = [a + i if a.dtype != np.bool_ else a ^ bool(i % 2) for a in step_like_arrays()]
        results.append((upload(arrays), arrays))
    torch.cuda.synchronize()
    for tensors, arrays in results:
        assert_same(tensors, arrays)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_raw_writes_each_chunk_at_its_offset(device):
    arrays = step_like_arrays()
    offsets = [16 * 40 * i for i in range(len(arrays))]  # spread out, not packed
    total = offsets[-1] + arrays[-1].nbytes
    buffer = Uploader(torch.device(device)).raw(list(zip(offsets, arrays)), total)
    assert buffer.dtype == torch.uint8 and buffer.numel() == total and buffer.device.type == device
    assert_same(unpack(buffer, arrays, offsets), arrays)
