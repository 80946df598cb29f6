"""Write a step's new K/V into the paged cache by slot, quantizing to FP8 when the cache is FP8.

Generalizes ``store_kvcache``: any cache dtype, any cache strides (contiguous head_dim), and
per-KV-head scales for an FP8 cache: ``fp8 = clamp(x / scale, -448, 448)``, keys less an optional
per-head, per-channel offset first (see ``LayerKVCache``). Tokens of the cache's first
``num_sink_blocks`` blocks also go to the float16 sink blocks, as ``x / scale`` (unclamped).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.attention.ops.paged_cache_checks import FP8_MAX, check_cache, check_scales, check_sinks
from nanovllm.utils.pdl import pdl_start, use_pdl

# An FP8 cache stores values dim-major (`kv_cache.dim_major`): each value is a byte store into its own
# 16-byte row of the block, so a decode step's store is bound by store instructions and partial rows,
# not bytes. One program (one warp) per (token, KV head) spreads them over more SMs. On the H200 (call BZ,
# Qwen3-0.6B's 8 KV heads of 128, CUDA graphs, slots in L2): 6.3 -> 2.9 us at 256 tokens, 1.75 -> 1.2 us at
# 16, while a prefill's 8,192 tokens took 48 us with a program per token against 80 us per (token, head)
# (65,536 programs). In the engine, where rows need not be in L2, less is left: `bench.py --kv-cache-dtype
# fp8` decode 3.54 -> 3.51 ms per step, the mean of three runs each alternating with main (call CC,
# within the runs' spread). So up to this many (token, KV head) pairs FP8 takes a program each; other caches
# keep one program per token (token-major rows; bf16: 1.8 us at 256 tokens, 1.4-2.9 with other grids).
FP8_PER_HEAD_MAX_PROGRAMS = 4096


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr, k_offset_ptr,
                     k_sink_ptr, v_sink_ptr, num_sink_blocks,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                     stride_vcb, stride_vct, stride_vch, stride_vcd,
                     num_kv_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr,
                     FP8: tl.constexpr, K_OFFSET: tl.constexpr, SINK: tl.constexpr, FP8_MAX: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_start(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    cache_offsets = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
                     + heads[:, None] * stride_ch + dims[None, :])
    v_offsets = ((slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vct
                 + heads[:, None] * stride_vch + dims[None, :] * stride_vcd)  # dim-major or as the keys
    if FP8:
        k_scale = tl.load(k_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)
        v_scale = tl.load(v_scale_ptr + heads, mask=heads < num_kv_heads, other=1.0)
        k = k.to(tl.float32)
        if K_OFFSET:
            k = k - tl.load(k_offset_ptr + heads[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        k = k / k_scale[:, None]
        v = v.to(tl.float32) / v_scale[:, None]
        # no NaN in an FP8 value cache: readers load whole blocks of values unmasked (probabilities of 0
        # cover the entries past a length, and 0 x NaN would not)
        v = tl.where(v == v, v, 0.0)
        if SINK:
            if slot // BLOCK_SIZE < num_sink_blocks:  # a sequence's first tokens: float16 as well
                tl.store(k_sink_ptr + cache_offsets, k.to(tl.float16), mask=mask)
                tl.store(v_sink_ptr + v_offsets, v.to(tl.float16), mask=mask)
        k = tl.clamp(k, -FP8_MAX, FP8_MAX)
        v = tl.clamp(v, -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + v_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None, k_offset: Tensor | None = None,
             k_sink: Tensor | None = None, v_sink: Tensor | None = None) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` to cache slot ``slot_mapping[t]``.

    Slot ``s`` is token ``s % block_size`` of physical block ``s // block_size``; slot -1 skips the
    token (padding). ``k_scale``/``v_scale`` (float32 ``[num_kv_heads]``) are required iff the cache
    is ``float8_e4m3fn``; ``k_offset`` (float32 ``[num_kv_heads, head_dim]``, FP8 only) is subtracted
    from the keys before they are scaled. ``k_sink``/``v_sink`` (FP8 only, see ``check_sinks``)
    receive the tokens of blocks ``0..k_sink.shape[0]-1`` in float16 too.
    """
    check_cache(key_cache, value_cache)
    fp8 = check_scales(key_cache, k_scale, v_scale)
    num_sink_blocks = check_sinks(key_cache, value_cache, k_sink, v_sink)
    num_tokens, (num_kv_heads, head_dim) = key.shape[0], key_cache.shape[2:]
    expected = (num_tokens, num_kv_heads, head_dim)
    if key.shape != value.shape or tuple(key.shape) != expected or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"key and value must be [num_tokens, num_kv_heads, head_dim] = {expected} with a contiguous "
                         f"head_dim, got {tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be an int64 (or int32) [num_tokens={num_tokens}] tensor, "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k_offset is not None and (not fp8 or k_offset.shape != (num_kv_heads, head_dim)
                                 or k_offset.dtype != torch.float32 or not k_offset.is_contiguous()):
        raise ValueError(f"k_offset must be a contiguous float32 [num_kv_heads, head_dim] = "
                         f"[{num_kv_heads}, {head_dim}] tensor with an FP8 cache, got {k_offset.dtype} "
                         f"{tuple(k_offset.shape)} with a {key_cache.dtype} cache")
    if num_tokens == 0:
        return
    pdl = use_pdl(key.device)
    per_head = fp8 and num_tokens * num_kv_heads <= FP8_PER_HEAD_MAX_PROGRAMS
    heads = 1 if per_head else triton.next_power_of_2(num_kv_heads)
    _store_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, heads))](
        key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, k_offset, k_sink, v_sink, num_sink_blocks,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), *key_cache.stride()[:3], *value_cache.stride(),
        num_kv_heads, BLOCK_SIZE=key_cache.shape[1], HEAD_DIM=head_dim,
        HEADS=heads, FP8=fp8, K_OFFSET=k_offset is not None,
        SINK=num_sink_blocks > 0, FP8_MAX=FP8_MAX, PDL=pdl, launch_pdl=pdl, num_warps=1 if per_head else 4,
    )
