"""Our own Triton kernels as an attention backend: fine pages (block 16) and FP8 KV caches (CUDA)."""
from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.ops.triton_decode import paged_attention
from nanovllm.attention.ops.triton_prefill import paged_prefill_attention
from nanovllm.attention.ops.triton_store_kv import store_kv


class TritonBackend(AttentionBackend):
    """PagedAttention decode (single pass or split-KV) and a causal prefill over the cached prefix.

    Any power-of-two block size >= 16; an FP8 cache is quantized by `write_kv` with the layer's
    per-KV-head scales and dequantized inside the kernels.
    """

    name = "triton"
    block_size_multiple = 16
    default_block_size = 16
    supports_cuda_graphs = True
    kv_cache_dtypes = ("auto", "fp8")

    def check_block_size(self, block_size: int) -> None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"kvcache_block_size={block_size} must be a power of two >= 16 with the triton "
                             "attention backend")

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 slot_mapping: torch.Tensor) -> None:
        store_kv(key, value, cache.key, cache.value, slot_mapping, cache.k_scale, cache.v_scale, cache.k_offset)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.max_query_len == 1:
            return paged_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens,
                                   cache.key.shape[1], meta.max_seq_len, scale, cache.k_scale, cache.v_scale)
        return paged_prefill_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc,
                                       meta.seq_lens, meta.max_query_len, meta.max_seq_len, scale,
                                       cache.k_scale, cache.v_scale)
