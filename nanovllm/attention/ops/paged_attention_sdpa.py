"""Decode attention for the CPU: one gather of each sequence's K/V, then one fused SDPA call.

Same cache layout and contract as :func:`paged_attention_ref.paged_attention_v1` (which the
tests compare it with), in a handful of ops per layer instead of dozens. The slots each
sequence reads depend only on the step's block tables and lengths, so they are computed once
per step (:func:`decode_gather`) and shared by every layer.

GQA needs no copies: a KV head's ``group`` query heads become ``group`` query rows of one
SDPA head, ``[seqs, kv_heads, group, head_dim]``, all attending to the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nanovllm.attention.ops.paged_attention_ref import dequantize


@dataclass(frozen=True)
class DecodeGather:
    """Where each decode sequence's context lies in the flattened cache.

    - ``slots`` [seqs, context] int64: the cache slot of each context position. Positions past
      a sequence's length repeat its last slot, so only slots it owns are read (unused ones may
      hold anything, NaN included) and no gathered value needs masking.
    - ``mask`` [seqs, 1, 1, context] bool: SDPA's ``attn_mask`` (True attends).
    - ``empty`` [seqs, 1, 1, 1] bool, or None when every sequence has context: rows whose output
      is zeroed (they read a slot they do not own).
    - ``last`` [seqs] int64: each sequence's last context position (0 for an empty one), the query's own.
    """

    slots: Tensor
    mask: Tensor
    empty: Tensor | None
    last: Tensor


def decode_gather(block_tables: Tensor, context_lens: Tensor, block_size: int, max_context_len: int) -> DecodeGather:
    """The slots of the first ``max_context_len`` positions of every sequence's block table."""
    num_blocks = -(-max_context_len // block_size)
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :num_blocks].long()[:, :, None] * block_size + offsets).flatten(1)[:, :max_context_len]
    valid = torch.arange(slots.shape[1], device=slots.device) < context_lens[:, None]
    last = (context_lens.long() - 1).clamp(min=0)
    empty = context_lens == 0
    return DecodeGather(torch.where(valid, slots, slots.gather(1, last[:, None])), valid[:, None, None, :],
                        empty[:, None, None, None] if bool(empty.any()) else None, last)


def paged_attention_sdpa(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    gather: DecodeGather,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    k_sink: Tensor | None = None,
    v_sink: Tensor | None = None,
    new_key: Tensor | None = None,
    new_value: Tensor | None = None,
    k_offset: Tensor | None = None,
) -> Tensor:
    """Decode attention of ``query`` [seqs, heads, head_dim] over the slots of ``gather``.

    Computes in float32 and returns ``query``'s dtype; an FP8 cache is dequantized with the
    per-KV-head ``k_scale``/``v_scale``, its first blocks read from ``k_sink``/``v_sink`` when
    given. A sequence with no context gets zeros. With ``new_key``/``new_value`` ([seqs, kv_heads,
    head_dim], the step's own K/V) each query reads its own (last) position from them instead,
    keys less ``k_offset`` (as ``paged_attention_ref.paged_prefill_attention``).
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    keys = _gather(key_cache, gather, k_scale, k_sink).transpose(1, 2)  # [seqs, kv_heads, context, head_dim]
    values = _gather(value_cache, gather, v_scale, v_sink).transpose(1, 2)
    if new_key is not None:
        seqs = torch.arange(num_seqs, device=query.device)
        own_k = new_key.float() - k_offset if k_offset is not None else new_key.float()
        keys[seqs, :, gather.last], values[seqs, :, gather.last] = own_k, new_value.float()
    q = query.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=gather.mask, scale=scale)
    if gather.empty is not None:
        out = out.masked_fill(gather.empty, 0.0)
    return out.flatten(1, 2).to(query.dtype)


def _gather(cache: Tensor, gather: DecodeGather, scale: Tensor | None, sink: Tensor | None) -> Tensor:
    """Float32 [seqs, context, kv_heads, head_dim] of the gathered slots (of the sink blocks for
    slots in blocks below ``sink.shape[0]``)."""
    block_size = cache.shape[1]
    blocks, offsets = gather.slots // block_size, gather.slots % block_size  # (a value cache may be dim-major)
    entries = cache[blocks, offsets]
    if sink is not None:
        in_sink = (blocks < sink.shape[0])[..., None, None]
        entries = torch.where(in_sink, sink[blocks.clamp(max=sink.shape[0] - 1), offsets].float(), entries.float())
    return dequantize(entries, scale).float()
