"""Pure-torch reference paged attention over a flash-attn style block-table KV cache.

Cache layout: ``key_cache``/``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``;
``block_tables[i, j]`` is the physical block holding tokens ``j*block_size ..`` of sequence ``i``.
Entries past a sequence's last block, and cache slots past its length, are never read into a
result (they may hold any value, NaN included). Softmax runs in float32; outputs keep the
query's dtype. An FP8 cache is read as ``fp8.float() * scale`` with optional per-KV-head
``k_scale``/``v_scale``, its first ``k_sink.shape[0]`` blocks from the float16 ``k_sink``/``v_sink``
when given (see ``LayerKVCache``). Query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def paged_attention_v1(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    max_context_len: int,
    scale: float | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
) -> Tensor:
    """Decode attention that gathers each sequence's blocks into one padded, masked context.

    ``query`` is ``[num_seqs, num_heads, head_dim]``; token ``i`` attends to the first
    ``context_lens[i]`` cached tokens of its sequence. Returns ``[num_seqs, num_heads, head_dim]``.
    """
    scale = _check_decode(
        query, key_cache, value_cache, block_tables, context_lens, block_size, max_context_len, scale
    )
    num_blocks = -(-max_context_len // block_size)
    blocks = block_tables[:, :num_blocks].long()
    keys = read_blocks(key_cache, blocks, k_scale, k_sink).flatten(1, 2)[:, :max_context_len]
    values = read_blocks(value_cache, blocks, v_scale, v_sink).flatten(1, 2)[:, :max_context_len]
    positions = torch.arange(keys.shape[1], device=query.device)
    valid = positions[None, :] < context_lens[:, None]
    scores, values = _grouped_scores(query, keys, values, valid, scale)
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid[:, None, None, :], 0.0)
    out = torch.einsum("skgt,stkd->skgd", probs, values)
    return out.flatten(1, 2).to(query.dtype)


def paged_attention_v2(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    max_context_len: int,
    scale: float | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
) -> Tensor:
    """Decode attention streamed one block-table column at a time with an online softmax.

    Same contract as :func:`paged_attention_v1`, but only one block per sequence is in flight:
    a running max, running denominator and rescaled accumulator replace the full context.
    """
    scale = _check_decode(
        query, key_cache, value_cache, block_tables, context_lens, block_size, max_context_len, scale
    )
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    stat_shape = (num_seqs, num_kv_heads, num_heads // num_kv_heads, 1)
    running_max = query.new_full(stat_shape, float("-inf"), dtype=torch.float32)
    denom = query.new_zeros(stat_shape, dtype=torch.float32)
    acc = query.new_zeros((*stat_shape[:3], head_dim), dtype=torch.float32)
    offsets = torch.arange(block_size, device=query.device)
    for j in range(-(-max_context_len // block_size)):
        blocks = block_tables[:, j].long()
        valid = (j * block_size + offsets)[None, :] < context_lens[:, None]
        scores, values = _grouped_scores(query, read_blocks(key_cache, blocks, k_scale, k_sink),
                                         read_blocks(value_cache, blocks, v_scale, v_sink), valid, scale)
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # no token seen yet: exp(-inf) = 0
        probs = torch.exp(scores - shift)
        rescale = torch.exp(running_max - shift)
        denom = denom * rescale + probs.sum(dim=-1, keepdim=True)
        acc = acc * rescale + torch.einsum("skgt,stkd->skgd", probs, values)
        running_max = new_max
    out = acc / denom.clamp_min(torch.finfo(torch.float32).tiny)  # empty context -> zeros
    return out.flatten(1, 2).to(query.dtype)


def paged_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    max_context_len: int,
    scale: float | None = None,
    version: int = 2,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
) -> Tensor:
    """Decode attention over the paged cache; ``version`` 1 gathers, 2 (default) streams."""
    kernels = {1: paged_attention_v1, 2: paged_attention_v2}
    if version not in kernels:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    return kernels[version](
        query, key_cache, value_cache, block_tables, context_lens, block_size, max_context_len, scale,
        k_scale, v_scale, k_sink, v_sink,
    )


def paged_prefill_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    block_tables: Tensor,
    scale: float | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
    new_key: Tensor | None = None,
    new_value: Tensor | None = None,
    k_offset: Tensor | None = None,
) -> Tensor:
    """Varlen causal prefill attention reading all K/V through the block table.

    ``query`` is ``[total_q_tokens, num_heads, head_dim]``. Sequence ``i`` owns queries
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``, which are the last ``q_len`` positions of its
    ``k_len``-token cached context; each attends to context positions up to its own
    (flash-attn's ``causal=True`` with bottom-right alignment). Returns ``query``'s shape; tokens
    past ``cu_seqlens_q[-1]`` (a CUDA graph's padding, owned by no sequence) come out as zeros.

    ``new_key``/``new_value`` (``[total_q_tokens, num_kv_heads, head_dim]``: the step's own K/V, row
    for row with the queries): each query reads its own position's K/V from them rather than from
    the cache, keys less ``k_offset`` (``[num_kv_heads, head_dim]``) as an FP8 cache holds them.
    That is what an FP8 cache's readers do (see ``LayerKVCache``).
    """
    _check_layout(query, key_cache, value_cache, block_tables)
    scale = _default_scale(query, scale)
    block_size = key_cache.shape[1]
    q_bounds, k_bounds = _check_cu_seqlens(query, cu_seqlens_q, cu_seqlens_k, block_tables, block_size)
    output = torch.zeros_like(query)
    for i, (q_start, q_end) in enumerate(zip(q_bounds, q_bounds[1:])):
        q_len, k_len = q_end - q_start, k_bounds[i + 1] - k_bounds[i]
        if q_len == 0:
            continue
        blocks = block_tables[i, : -(-k_len // block_size)].long()
        keys = read_blocks(key_cache, blocks, k_scale, k_sink).flatten(0, 1)[:k_len]
        values = read_blocks(value_cache, blocks, v_scale, v_sink).flatten(0, 1)[:k_len]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        q, k, v = (x.transpose(0, 1).float() for x in (query[q_start:q_end], keys, values))
        if new_key is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=True)
        else:
            own_k, own_v = (x[q_start:q_end].float() for x in (new_key, new_value))
            own_k = own_k - k_offset if k_offset is not None else own_k
            out = _attend_with_own(q, k, v, causal, scale, own_k.transpose(0, 1), own_v.transpose(0, 1))
        output[q_start:q_end] = out.transpose(0, 1).to(query.dtype)
    return output


def _attend_with_own(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float, own_k: Tensor,
                     own_v: Tensor) -> Tensor:
    """Causal attention of ``q`` [heads, q_len, head_dim] over ``k``/``v`` [kv_heads, k_len, head_dim]
    (float32) in which query ``i`` reads its own position, ``k_len - q_len + i``, from ``own_k``/``own_v``
    [kv_heads, q_len, head_dim] instead: its score on the diagonal is replaced, and the probability it
    gets there weighs its own value rather than the cached one."""
    group = q.shape[0] // k.shape[0]
    k, v, own_k, own_v = (x.repeat_interleave(group, 0) for x in (k, v, own_k, own_v))
    q_len, k_len = q.shape[1], k.shape[1]
    rows = torch.arange(q_len, device=q.device)
    own = rows + k_len - q_len
    scores = q @ k.transpose(1, 2) * scale
    scores[:, rows, own] = (q * own_k).sum(-1) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs @ v + probs[:, rows, own, None] * (own_v - v[:, own])


def read_blocks(cache: Tensor, blocks: Tensor, scale: Tensor | None, sink: Tensor | None = None) -> Tensor:
    """The cache's blocks ``blocks`` (an int tensor of any shape), dequantized; those below
    ``sink.shape[0]`` come from the float16 ``sink`` blocks when given."""
    entries = cache[blocks]
    if sink is not None:
        in_sink = (blocks < sink.shape[0]).view(*blocks.shape, 1, 1, 1)
        entries = torch.where(in_sink, sink[blocks.clamp(max=sink.shape[0] - 1)].float(), entries.float())
    return dequantize(entries, scale)


def dequantize(cache: Tensor, scale: Tensor | None) -> Tensor:
    """FP8 cache entries ``[..., num_kv_heads, head_dim]`` (blocks gathered from the cache) in float32
    times their per-KV-head ``scale`` (``[num_kv_heads]``); with no scale they are returned unchanged."""
    if scale is None:
        return cache
    if scale.shape != (cache.shape[-2],):
        raise ValueError(f"scale must be [num_kv_heads={cache.shape[-2]}], got {tuple(scale.shape)}")
    return cache.float() * scale.float()[:, None]


def _grouped_scores(
    query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Float32 masked scores ``[seqs, kv_heads, group, tokens]`` and values with masked tokens zeroed.

    ``keys``/``values`` are ``[seqs, tokens, kv_heads, head_dim]``, ``valid`` is ``[seqs, tokens]``.
    Zeroing masked values keeps garbage (even NaN) in unused cache slots out of the result.
    """
    num_seqs, num_heads, head_dim = query.shape
    q = query.float().view(num_seqs, keys.shape[2], -1, head_dim)
    scores = torch.einsum("skgd,stkd->skgt", q, keys.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return scores, values.float().masked_fill(~valid[:, :, None, None], 0.0)


def _default_scale(query: Tensor, scale: float | None) -> float:
    return query.shape[-1] ** -0.5 if scale is None else scale


def _check_layout(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor) -> None:
    """Validate the shapes shared by decode and prefill."""
    if query.dim() != 3:
        raise ValueError(f"query must be [tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.is_floating_point():
        raise ValueError(
            "block_tables must be an integer [num_seqs, max_blocks_per_seq] tensor, "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query head_dim ({query.shape[2]}) != cache head_dim ({key_cache.shape[3]})")


def _check_decode(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    block_size: int,
    max_context_len: int,
    scale: float | None,
) -> float:
    """Validate decode arguments and return the softmax scale."""
    _check_layout(query, key_cache, value_cache, block_tables)
    num_seqs = query.shape[0]
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
            f"must have one row per sequence ({num_seqs})"
        )
    if block_size != key_cache.shape[1]:
        raise ValueError(f"block_size ({block_size}) != cache block size ({key_cache.shape[1]})")
    if max_context_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_context_len ({max_context_len}) exceeds the block table's {block_tables.shape[1]} blocks"
        )
    capturing = context_lens.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync in a graph
    if num_seqs and not capturing and int(context_lens.max()) > max_context_len:
        raise ValueError(f"context_lens exceed max_context_len ({max_context_len})")
    return _default_scale(query, scale)


def _check_cu_seqlens(
    query: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, block_tables: Tensor, block_size: int
) -> tuple[list[int], list[int]]:
    """Validate prefill lengths and return the cumulative bounds as Python lists."""
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
            "must be 1-D of equal length"
        )
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    num_seqs = block_tables.shape[0]
    if len(q_bounds) != num_seqs + 1 or q_bounds[0] != 0 or q_bounds[-1] > query.shape[0]:
        raise ValueError(
            f"cu_seqlens_q must run from 0 to at most {query.shape[0]} over {num_seqs} sequences, got {q_bounds}"
        )
    for i in range(num_seqs):
        q_len, k_len = q_bounds[i + 1] - q_bounds[i], k_bounds[i + 1] - k_bounds[i]
        if not 0 <= q_len <= k_len <= block_tables.shape[1] * block_size:
            raise ValueError(
                f"sequence {i}: need 0 <= q_len ({q_len}) <= k_len ({k_len}) <= block table capacity "
                f"({block_tables.shape[1] * block_size})"
            )
    return q_bounds, k_bounds
