"""Small elementwise chains of a layer as one GPU kernel each: a torch definition, and a Triton kernel
(`layers/fused_kernels.py`) that replaces it on CUDA.

A decode step of a small model is thousands of tiny elementwise kernels (norms in float32, rotary,
silu * up); fused they cost a fraction of the GPU time. On CPU the eager ops are fast enough.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def on_cuda_use(kernel: Callable) -> Callable[[F], F]:
    """Decorate a torch definition: when its first argument is on CUDA, `kernel` (same signature and
    results, up to rounding) runs instead."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(x: torch.Tensor, *args: object) -> object:
            return kernel(x, *args) if x.is_cuda else fn(x, *args)

        return wrapper  # type: ignore[return-value]

    return decorate
