"""flash-attn 2 block-table kernels as an attention backend (CUDA only, optional extra)."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.attention.ops.store_kvcache import store_kvcache
from nanovllm.layers.attention import AttentionMetadata


class FlashAttnBackend:
    """Prefill with varlen attention, decode with the split-KV kvcache kernel.

    flash-attn 2's paged kernels need the block size to be a multiple of 256.
    """

    block_size_multiple = 256
    supports_cuda_graphs = True

    def store_kvcache(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kvcache(key, value, k_cache, v_cache, slot_mapping)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.has_cached_prefix:  # some queries attend to tokens that only the cache holds
            k, v, block_table = k_cache, v_cache, meta.block_tables
        else:
            block_table = None
        return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                      meta.max_context_len, softmax_scale=scale, causal=True,
                                      block_table=block_table)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                      block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
