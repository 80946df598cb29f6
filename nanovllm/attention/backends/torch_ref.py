"""The pure-torch reference backend: runs anywhere, the one used on CPU."""
from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.ops.paged_attention_ref import paged_attention, paged_prefill_attention


class TorchRefBackend(AttentionBackend):
    """Gathers through block tables in plain torch, softmax in float32.

    Its cache write skips padding slots with a data-dependent mask, which a CUDA
    graph cannot capture, so it runs eagerly.
    """

    name = "torch"
    block_size_multiple = 1
    default_block_size = 16
    supports_cuda_graphs = False

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        cache.key.view(-1, *cache.key.shape[2:]).index_copy_(0, slots, key[keep].to(cache.key.dtype))
        cache.value.view(-1, *cache.value.shape[2:]).index_copy_(0, slots, value[keep].to(cache.value.dtype))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.max_query_len == 1:
            return paged_attention(query, cache.key, cache.value, meta.block_tables, meta.seq_lens,
                                   cache.key.shape[1], meta.max_seq_len, scale=scale)
        return paged_prefill_attention(query, cache.key, cache.value, meta.query_start_loc, meta.seq_start_loc,
                                       meta.block_tables, scale=scale)
