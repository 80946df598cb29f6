"""Triton causal attention of several query tokens per sequence over the paged KV cache.

Covers prefill, chunked prefill and speculative verification alike: sequence ``i``'s queries are
the last ``q_len`` positions of its ``seq_lens[i]``-token context, whose K/V (this step's
included) are all in the cache already. Causality is bottom-right aligned (flash-attn's
``causal=True``).

One program handles ``BLOCK_M`` query rows of one sequence and one KV head: ``BLOCK_M // group``
consecutive query tokens times the ``group`` query heads sharing that KV head, so each K/V tile is
loaded once for all of them. K/V tiles of ``BLOCK_N`` tokens are gathered through the block table
(tile size independent of the cache's block size). Tiles every row sees in full run without a
mask, tiles on the diagonal with one, and tiles past the last row's position are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nanovllm.attention.ops.paged_cache_checks import (
    check_block_tables,
    check_cache,
    check_int_vector,
    check_own_kv,
    check_query,
    check_scales,
    check_sinks,
)
from nanovllm.attention.ops.triton_decode import LOG2E, _attend_tiles, _scaled_query, _start, own_strides
from nanovllm.utils.pdl import pdl_start, use_pdl

BLOCK_N = 64  # K/V tokens per tile


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    k_scale_ptr, v_scale_ptr, k_sink_ptr, v_sink_ptr, new_k_ptr, new_v_ptr, k_offset_ptr, num_sink_blocks, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt, stride_vb, stride_vh,
    stride_vd, stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, SINK: tl.constexpr, OWN: tl.constexpr,
    K_OFFSET: tl.constexpr, V_DIM_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_P: tl.constexpr, PDL: tl.constexpr,
):
    pdl_start(PDL)
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first = q_tile * TOKENS  # TOKENS = BLOCK_M // GROUP query tokens per program
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = seq_len - q_len  # position of the first query token

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    token = first + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < TOKENS * GROUP) & (token < q_len)
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    q_pos = context_start + token  # >= 0, so K/V position 0 is visible to every row
    q, qk_scale = _scaled_query(q, scale_log2, k_scale_ptr, kv_head, FP8)
    table = block_tables_ptr + seq * stride_bt
    head_offset = kv_head * stride_ch

    acc, running_max, running_sum = _start(
        q, row_mask, new_k_ptr, new_v_ptr, (q_start + token) * stride_nkt + kv_head * stride_nkh,
        (q_start + token) * stride_nvt + kv_head * stride_nvh, k_offset_ptr, v_scale_ptr, kv_head, BLOCK_M,
        HEAD_DIM, OWN, K_OFFSET)
    # the rows see the positions up to their own, or (OWN) before it: their own K/V come from the step's
    full_end = (context_start + first + 1 - OWN) // BLOCK_N * BLOCK_N  # tiles every row sees entirely
    kv_end = context_start + tl.minimum(first + TOKENS, q_len)  # one past the last row's position
    v_head_offset = kv_head * stride_vh
    acc, running_max, running_sum = _attend_tiles(
        acc, running_max, running_sum, q, q_pos, 0, full_end, full_end, k_cache_ptr, v_cache_ptr, k_sink_ptr,
        v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset, qk_scale, stride_cb, stride_ct, stride_vb,
        stride_vd, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, False, SINK, V_DIM_MAJOR, PRECISION, SPLIT_P)
    acc, running_max, running_sum = _attend_tiles(
        acc, running_max, running_sum, q, q_pos - OWN, full_end, kv_end, kv_end, k_cache_ptr, v_cache_ptr,
        k_sink_ptr, v_sink_ptr, num_sink_blocks, table, head_offset, v_head_offset, qk_scale, stride_cb, stride_ct,
        stride_vb, stride_vd, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, True, SINK, V_DIM_MAJOR, PRECISION, SPLIT_P)

    out = acc / running_sum[:, None]  # every row saw position 0 (its own, or one before): running_sum >= 1
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
    new_key: Tensor | None = None,
    new_value: Tensor | None = None,
    k_offset: Tensor | None = None,
) -> Tensor:
    """Causal attention of ``query`` ``[total_q, num_heads, head_dim]`` over the paged cache.

    Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (``[num_seqs + 1]``
    int32), at most ``max_query_len`` of them, and ``seq_lens[i]`` (int32, ``<= max_seq_len``)
    cached tokens. Rows past ``query_start_loc[-1]`` (padding) come out as zeros. Returns the
    query's shape and dtype. ``k_sink``/``v_sink``, ``new_key``/``new_value``/``k_offset`` (each
    query's own K/V read unrounded): as for ``triton_decode.paged_attention``.
    """
    v_dim_major = check_cache(key_cache, value_cache)
    fp8 = check_scales(key_cache, k_scale, v_scale)
    num_sink_blocks = check_sinks(key_cache, value_cache, k_sink, v_sink)
    group = check_query(query, key_cache)
    own = check_own_kv(query, key_cache, new_key, new_value, k_offset)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_int_vector("seq_lens", seq_lens, num_seqs)
    check_int_vector("query_start_loc", query_start_loc, num_seqs + 1)
    check_block_tables(block_tables, num_seqs)
    block_size = key_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if not 0 <= max_query_len <= max_seq_len <= capacity:
        raise ValueError(f"need 0 <= max_query_len ({max_query_len}) <= max_seq_len ({max_seq_len}) "
                         f"<= block table capacity ({capacity})")
    out = torch.zeros_like(query)
    if num_seqs == 0 or max_query_len == 0:
        return out
    head_dim, num_kv_heads = query.shape[2], key_cache.shape[2]
    block_m = min(128, max(16, triton.next_power_of_2(max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    tokens_per_program = block_m // group
    grid = (num_seqs, triton.cdiv(max_query_len, tokens_per_program), num_kv_heads)
    pdl = use_pdl(query.device)
    _prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, k_scale, v_scale,
        k_sink, v_sink, new_key, new_value, k_offset, num_sink_blocks, scale * LOG2E, query.stride(0), query.stride(1),
        out.stride(0), out.stride(1), *key_cache.stride()[:3], block_tables.stride(0), value_cache.stride(0),
        value_cache.stride(2), value_cache.stride(3), *own_strides(new_key, new_value), GROUP=group,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, TOKENS=tokens_per_program, BLOCK_N=BLOCK_N,
        FP8=fp8, SINK=num_sink_blocks > 0, OWN=own, K_OFFSET=k_offset is not None, V_DIM_MAJOR=v_dim_major,
        PRECISION="ieee" if query.dtype == torch.float32 and not fp8 else "tf32",
        SPLIT_P=query.dtype == torch.bfloat16 and not fp8,
        PDL=pdl, num_warps=8 if block_m >= 128 else 4, num_stages=2, launch_pdl=pdl,
    )
    return out
