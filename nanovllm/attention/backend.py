"""The interface every attention backend implements: what the engine must know, and two calls.

A new backend (a kernel library, a Triton kernel) is one file in `backends/` with
a subclass of `AttentionBackend`, and a line in `selector.py`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache, then attends over it."""

    name: str
    block_size_multiple: int  # block sizes must be multiples of this (flash-attn 2: 256)
    default_block_size: int
    supports_cuda_graphs: bool  # its calls can be captured (no host syncs, fixed shapes)
    kv_cache_dtypes: tuple[str, ...] = ("auto",)  # the Config.kv_cache_dtype values it reads

    def check_block_size(self, block_size: int) -> None:
        """ValueError unless the backend's kernels take this block size."""
        if block_size % self.block_size_multiple:
            raise ValueError(f"kvcache_block_size={block_size} must be a multiple of {self.block_size_multiple} "
                             f"with the {self.name} attention backend")

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """One layer's key (or value) cache; the block dimension comes first."""
        return (num_blocks, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 slot_mapping: torch.Tensor) -> None:
        """key/value [T, num_kv_heads, head_dim] into their slots; slot -1 is skipped."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of query [T, num_heads, head_dim] over the cache, once this step's K/V are in it.

        key/value are this step's own (some backends read them directly when no prefix is cached).
        """
