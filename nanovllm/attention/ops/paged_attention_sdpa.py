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

    - ``slots`` [seqs, context] int64: the cache slot of each context position (arbitrary,
      but in range, past a sequence's length).
    - ``invalid`` [seqs, context, 1, 1] bool: positions past the length; gathered K/V there
      are zeroed, so NaN in unused slots cannot reach the result.
    - ``mask`` [seqs, 1, 1, context] bool: SDPA's ``attn_mask`` (True attends).
    """

    slots: Tensor
    invalid: Tensor
    mask: Tensor


def decode_gather(block_tables: Tensor, context_lens: Tensor, block_size: int, max_context_len: int) -> DecodeGather:
    """The slots of the first ``max_context_len`` positions of every sequence's block table."""
    num_blocks = -(-max_context_len // block_size)
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :num_blocks].long()[:, :, None] * block_size + offsets).flatten(1)[:, :max_context_len]
    valid = torch.arange(slots.shape[1], device=slots.device) < context_lens[:, None]
    return DecodeGather(slots, ~valid[:, :, None, None], valid[:, None, None, :])


def paged_attention_sdpa(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    gather: DecodeGather,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Decode attention of ``query`` [seqs, heads, head_dim] over the slots of ``gather``.

    Computes in float32 and returns ``query``'s dtype; an FP8 cache is dequantized with the
    per-KV-head ``k_scale``/``v_scale``. A sequence with no context gets zeros (SDPA's answer
    for a row that attends to nothing).
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    keys = _gather(key_cache, gather, k_scale).transpose(1, 2)  # [seqs, kv_heads, context, head_dim]
    values = _gather(value_cache, gather, v_scale).transpose(1, 2)
    q = query.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=gather.mask, scale=scale)
    return out.flatten(1, 2).to(query.dtype)


def _gather(cache: Tensor, gather: DecodeGather, scale: Tensor | None) -> Tensor:
    """Float32 [seqs, context, kv_heads, head_dim] of the gathered slots, zero past each length."""
    flat = cache.view(-1, *cache.shape[2:])
    return dequantize(flat[gather.slots], scale).float().masked_fill_(gather.invalid, 0.0)
