"""One Triton kernel that writes a step's new K and V into the paged cache by slot."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          key_stride, value_stride, D: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    offsets = tl.arange(0, BLOCK)
    mask = offsets < D
    k = tl.load(key_ptr + token * key_stride + offsets, mask=mask)
    v = tl.load(value_ptr + token * value_stride + offsets, mask=mask)
    tl.store(k_cache_ptr + slot * D + offsets, k, mask=mask)
    tl.store(v_cache_ptr + slot * D + offsets, v, mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """key/value: [tokens, kv_heads, head_dim], heads contiguous; caches: [blocks, block_size, kv_heads, head_dim]."""
    num_tokens, num_heads, head_dim = key.shape
    D = num_heads * head_dim
    assert key.stride(-1) == 1 and key.stride(1) == head_dim and value.stride(-1) == 1 and value.stride(1) == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.numel() == num_tokens
    _store_kvcache_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping,
                                         key.stride(0), value.stride(0), D, triton.next_power_of_2(D))
