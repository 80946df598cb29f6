"""flash-attn 2's block-table kernels as an attention backend (CUDA only, the `gpu` extra)."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.ops.store_kvcache import store_kvcache


class FlashAttnBackend(AttentionBackend):
    """Varlen attention for several query tokens per sequence, the split-KV kvcache kernel for one.

    flash-attn 2's paged kernels need the block size to be a multiple of 256.
    """

    name = "flash_attn"
    block_size_multiple = 256
    default_block_size = 256
    supports_cuda_graphs = True

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 slot_mapping: torch.Tensor) -> None:
        store_kvcache(key, value, cache.key, cache.value, slot_mapping)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.max_query_len == 1:
            out = flash_attn_with_kvcache(query.unsqueeze(1), cache.key, cache.value, cache_seqlens=meta.seq_lens,
                                          block_table=meta.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        block_table = None
        if meta.has_prefix:  # some queries attend to tokens that only the cache holds
            key, value, block_table = cache.key, cache.value, meta.block_tables
        return flash_attn_varlen_func(query, key, value, meta.query_start_loc, meta.seq_start_loc,
                                      meta.max_query_len, meta.max_seq_len, softmax_scale=scale, causal=True,
                                      block_table=block_table)
