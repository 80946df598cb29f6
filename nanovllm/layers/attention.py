"""The attention layer: writes a step's K/V into its layer's paged cache and attends over it."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Multi-head attention over one layer's paged KV cache.

    `num_kv_heads` is the number of KV heads this module holds: the model runner sizes
    the cache from it. The runner binds `kv_cache` and `backend` once the cache exists.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = head_dim**-0.5
        self.kv_cache: LayerKVCache | None = None
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        self.backend.write_kv(k, v, self.kv_cache, meta.slot_mapping)
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
