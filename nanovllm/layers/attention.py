"""Paged attention: write new K/V into the cache by slot, read it back through block tables."""
from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Protocol

import torch
from torch import nn

from nanovllm.attention.ops.paged_attention_ref import paged_attention, paged_prefill_attention

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """What attention needs to know about the batch, handed down the forward.

    Shapes follow flash-attn's block-table calls. `context_lens[i]` counts the
    tokens of sequence i in the cache once this step's K/V are written.
    `slot_mapping[t]` is where token t's K/V go (block * block_size + offset);
    -1 skips a padding token.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_context_len: int
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    has_cached_prefix: bool = False


class AttentionBackend(Protocol):
    """Computes attention over a paged cache once the new K/V are in it."""

    block_size_multiple: int
    supports_cuda_graphs: bool

    def store_kvcache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor: ...

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchBackend:
    """The pure-torch reference backend: runs anywhere, used on CPU.

    Its cache write skips padding slots with a data-dependent mask, which a CUDA
    graph cannot capture, so it runs eagerly.
    """

    block_size_multiple = 1
    supports_cuda_graphs = False

    def store_kvcache(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key[keep])
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value[keep])

    def prefill(self, q, k, v, k_cache, v_cache, meta, scale):
        return paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                                       meta.block_tables, scale=scale)

    def decode(self, q, k_cache, v_cache, meta, scale):
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                               k_cache.shape[1], meta.max_context_len, scale=scale)


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """"auto": flash-attn when it imports on CUDA and the dtype is half, else the torch reference."""
    backend: AttentionBackend = TorchBackend()
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "flash_attn" and (device.type != "cuda" or not half):
        raise ValueError(f"attention_backend='flash_attn' needs a CUDA device and float16/bfloat16, "
                         f"got {device} and {dtype}")
    if name != "torch" and device.type == "cuda" and half:
        try:
            from nanovllm.kernels.flash_attn_backend import FlashAttnBackend
            backend = FlashAttnBackend()
        except ImportError as e:
            if name == "flash_attn":
                raise ValueError(f"attention_backend='flash_attn' but flash-attn does not import: {e}; "
                                 "install it with `pip install nanovllm[gpu]`") from e
    logger.info("attention backend: %s", type(backend).__name__)
    return backend


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache of one layer.

    The model runner binds `k_cache`/`v_cache` ([num_blocks, block_size,
    num_kv_heads, head_dim]) and the backend once the cache is allocated.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = head_dim**-0.5
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend: AttentionBackend = TorchBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]."""
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.backend.decode(q, self.k_cache, self.v_cache, meta, self.scale)
