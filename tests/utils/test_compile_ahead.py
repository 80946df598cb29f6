"""compile_ahead: a piece of work's Triton builds done on a thread pool with nothing launched, after which the
work runs for real without building anything; off CUDA it does nothing."""
from __future__ import annotations

import threading

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from nanovllm.utils.compile_ahead import BUILD_TIME, compile_ahead

@triton.jit
def _fill_kernel(out_ptr, value, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, value, mask=offsets < n)


@triton.jit
def _unbuildable_kernel(out_ptr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK < 0, "this kernel never builds")
    tl.store(out_ptr + tl.arange(0, BLOCK), 1.0)


def fill_all(outs: list[torch.Tensor], blocks: list[int]) -> None:
    """One launch per (tensor, block): each block size is a specialization of its own."""
    for out, block in zip(outs, blocks):
        _fill_kernel[(triton.cdiv(out.numel(), block),)](out, 1.0, out.numel(), BLOCK=block)


def test_off_cuda_it_runs_nothing():
    calls, before = [], (BUILD_TIME.builds, BUILD_TIME.seconds)
    assert compile_ahead(torch.device("cpu"), lambda: calls.append(1)) == 0
    assert calls == [] and (BUILD_TIME.builds, BUILD_TIME.seconds) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_builds_in_the_pool_launch_nothing_and_leave_nothing_to_build():
    device = torch.device("cuda")
    blocks = [32, 64, 128, 256, 64]  # four specializations, one launched twice
    outs = [torch.zeros(1000, device=device) for _ in blocks]
    built_on: list[str] = []
    knobs.runtime.jit_post_compile_hook = lambda **_: built_on.append(threading.current_thread().name)
    before = (BUILD_TIME.builds, BUILD_TIME.seconds)
    try:
        assert compile_ahead(device, lambda: fill_all(outs, blocks)) == 4
        assert BUILD_TIME.builds == before[0] + 4 and BUILD_TIME.seconds > before[1]
        torch.cuda.synchronize()
        assert not any(out.any() for out in outs), "a launch ran inside compile_ahead"
        assert len(built_on) == 4 and all(name.startswith("triton-build") for name in built_on), built_on
        assert knobs.runtime.jit_cache_hook is None
        fill_all(outs, blocks)
        torch.cuda.synchronize()
        assert all(bool((out == 1).all()) for out in outs)
        assert len(built_on) == 4, "the real launches built again"
    finally:
        knobs.runtime.jit_post_compile_hook = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_build_raises_after_the_work_and_releases_the_hook():
    device = torch.device("cuda")
    out = torch.zeros(16, device=device)
    with pytest.raises(triton.CompilationError, match="never builds"):
        compile_ahead(device, lambda: _unbuildable_kernel[(1,)](out, BLOCK=16))
    assert knobs.runtime.jit_cache_hook is None
    assert compile_ahead(device, lambda: fill_all([out], [512])) == 1
