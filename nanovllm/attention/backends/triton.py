"""Our own Triton kernels as an attention backend: fine pages (block 16) and FP8 KV caches (CUDA)."""
from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.ops.triton_decode import longest_first_pays, paged_attention
from nanovllm.attention.ops.triton_prefill import paged_prefill_attention
from nanovllm.attention.ops.triton_store_kv import store_kv

try:  # the `gpu` extra: prefill with no cached prefix is plain varlen attention, flash-attn's strength
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

FLASH_HEAD_DIMS = (64, 128)  # the head dims of the flash-attn builds the project tests
# A few query tokens per sequence over a cached prefix (speculative verification: k + 1) go through
# the decode kernel, whose partitions split a long context over many programs, while query tokens
# times the GQA group fit this many rows of one program.
MAX_SPLIT_ROWS = 64


class TritonBackend(AttentionBackend):
    """PagedAttention decode (single pass or split-KV, also for a few query tokens per sequence) and
    a causal prefill over the cached prefix.

    Any power-of-two block size >= 16; an FP8 cache is quantized by `write_kv` with the layer's
    per-KV-head scales and dequantized inside the kernels, which read each query's own token from
    the step's K/V instead (see `LayerKVCache`). With a bf16/fp16 cache, a prefill
    with no cached prefix needs nothing from the cache: when flash-attn is installed it runs
    flash-attn's varlen kernel on the step's own K/V, twice the speed of our prefill kernel
    (which splits bf16 probabilities in two for accuracy). An FP8 cache keeps our kernel, so
    that every step attends to the same quantized K/V.
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
        store_kv(key, value, cache.key, cache.value, slot_mapping, cache.k_scale, cache.v_scale, cache.k_offset,
                 cache.k_sink, cache.v_sink)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        order = meta.seq_order if longest_first_pays(meta.num_seqs, cache.key.shape[2], query.device) else None
        own = cache.own_kv(key, value)
        if meta.max_query_len == 1:
            return paged_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens,
                                   cache.key.shape[1], meta.max_seq_len, scale, cache.k_scale, cache.v_scale,
                                   k_sink=cache.k_sink, v_sink=cache.v_sink, seq_order=order, **own)
        group = query.shape[1] // cache.key.shape[2]
        if meta.has_prefix and meta.max_query_len * group <= MAX_SPLIT_ROWS:
            return paged_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens,
                                   cache.key.shape[1], meta.max_seq_len, scale, cache.k_scale, cache.v_scale,
                                   query_start_loc=meta.query_start_loc, max_query_len=meta.max_query_len,
                                   k_sink=cache.k_sink, v_sink=cache.v_sink, seq_order=order, **own)
        if not meta.has_prefix and flash_attn_varlen_func is not None and cache.key.dtype == query.dtype \
                and query.dtype != torch.float32 and query.shape[-1] in FLASH_HEAD_DIMS:
            return flash_attn_varlen_func(query, key, value, meta.query_start_loc, meta.seq_start_loc,
                                          meta.max_query_len, meta.max_seq_len, softmax_scale=scale, causal=True)
        return paged_prefill_attention(query, cache.key, cache.value, meta.block_tables, meta.query_start_loc,
                                       meta.seq_lens, meta.max_query_len, meta.max_seq_len, scale,
                                       cache.k_scale, cache.v_scale, cache.k_sink, cache.v_sink, **own)
