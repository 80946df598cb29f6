"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on Hopper and newer.

In a CUDA graph each kernel normally starts only once the one before it has finished: between two
dependent kernels the SMs idle for the launch (~1-2 us), and a batch-1 decode step of Qwen3-0.6B is
~310 kernels of 1-9 us each. A kernel launched with PDL may start while its predecessor still runs.
Its programs then

1. let their own successor launch (``griddepcontrol.launch_dependents``),
2. read what no kernel of the step writes (weights, written at load: the GEMV's first tile of W)
   and compute addresses,
3. wait (``griddepcontrol.wait``) until the predecessor has completed and its writes are visible,
4. and only then read its outputs or write anything (a buffer the predecessor still reads may be
   the one they write: the caching allocator reuses memory).

The wait is transitive (a predecessor's programs finished their own wait before completing), so a
kernel that waits sees every earlier kernel's writes. A kernel launched without PDL (cuBLAS, torch's
own) waits for the whole predecessor as usual, and a PDL launch after one of them just starts as
its programs exit. Kernels take ``PDL: tl.constexpr`` (the two calls compile away when it is off,
e.g. under the CPU interpreter) and launchers pass ``launch_pdl=PDL`` with the same value.

``NANOVLLM_DISABLE_PDL=1`` turns it off, to compare.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL: CUDA sm90+, unless NANOVLLM_DISABLE_PDL=1."""
    if device.type != "cuda" or os.environ.get("NANOVLLM_DISABLE_PDL", "0") == "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel's programs start (they wait for this kernel before touching its data)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel to complete and its writes to be visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Both, for a kernel with nothing to read before its predecessor's data."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
