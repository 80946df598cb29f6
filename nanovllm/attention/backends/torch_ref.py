"""The pure-torch reference backend: runs anywhere, the one used on CPU."""
from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.kv_cache import FP8_MAX, LayerKVCache
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.ops.paged_attention_ref import paged_prefill_attention
from nanovllm.attention.ops.paged_attention_sdpa import DecodeGather, decode_gather, paged_attention_sdpa


class TorchRefBackend(AttentionBackend):
    """Gathers through block tables in plain torch, softmax in float32.

    Its cache write skips padding slots with a data-dependent mask, which a CUDA
    graph cannot capture, so it runs eagerly. Decode gathers each sequence's K/V and
    calls SDPA once per layer. The slots to write and to gather are the same in every
    layer, so the first layer of a step computes them and the others reuse them (kept
    with the step's slot_mapping and metadata objects, which a new step replaces).
    """

    name = "torch"
    block_size_multiple = 1
    default_block_size = 16
    supports_cuda_graphs = False
    kv_cache_dtypes = ("auto", "fp8")

    def __init__(self) -> None:
        self._writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._step: tuple[AttentionMetadata, DecodeGather] | None = None

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                 slot_mapping: torch.Tensor) -> None:
        slots, keep = self._written_slots(slot_mapping)
        if keep is not None:
            key, value = key[keep], value[keep]
        key = key.float() - cache.k_offset if cache.k_offset is not None else key
        block_size = cache.key.shape[1]
        blocks, offsets = slots // block_size, slots % block_size  # (the value cache may be a dim-major view)
        in_sink = blocks < cache.k_sink.shape[0] if cache.k_sink is not None else None
        if cache.v_scale is not None:  # as the Triton store: no NaN in an FP8 value cache
            value = torch.nan_to_num(value.float(), nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        for x, target, scale, sink in ((key, cache.key, cache.k_scale, cache.k_sink),
                                       (value, cache.value, cache.v_scale, cache.v_sink)):
            new = quantize(x, target.dtype, scale)
            if scale is not None:  # torch cannot index_put float8: copy the bytes
                target, new = target.view(torch.uint8), new.view(torch.uint8)
            target[blocks, offsets] = new
            if in_sink is not None:  # a sequence's first tokens: float16 as well, unsaturated
                sink[blocks[in_sink], offsets[in_sink]] = (x[in_sink].float() / scale[:, None]).half()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        own = cache.own_kv(key, value)
        if meta.max_query_len == 1:
            return paged_attention_sdpa(query, cache.key, cache.value, self._decode_gather(meta, cache.key.shape[1]),
                                        scale, k_scale=cache.k_scale, v_scale=cache.v_scale, k_sink=cache.k_sink,
                                        v_sink=cache.v_sink, **own)
        return paged_prefill_attention(query, cache.key, cache.value, meta.query_start_loc, meta.seq_start_loc,
                                       meta.block_tables, scale=scale, k_scale=cache.k_scale, v_scale=cache.v_scale,
                                       k_sink=cache.k_sink, v_sink=cache.v_sink, **own)

    def _written_slots(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's slots to write and, when some of its rows are padding (-1), the rows to keep."""
        if self._writes is None or self._writes[0] is not slot_mapping:
            keep = slot_mapping >= 0
            self._writes = (slot_mapping, slot_mapping[keep], None if bool(keep.all()) else keep)
        return self._writes[1], self._writes[2]

    def _decode_gather(self, meta: AttentionMetadata, block_size: int) -> DecodeGather:
        """The step's decode slots, computed by its first layer."""
        if self._step is None or self._step[0] is not meta:
            self._step = (meta, decode_gather(meta.block_tables, meta.seq_lens, block_size, meta.max_seq_len))
        return self._step[1]


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] in the cache's dtype; FP8 divides by the per-head scale and saturates."""
    if scale is None:
        return x.to(dtype)
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(dtype)
