"""The paged KV cache: one tensor for every layer, a view per layer handed to attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Config.kv_cache_dtype -> the cache's element type ("auto": the model's dtype)
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


def dim_major(blocks: torch.Tensor) -> torch.Tensor:
    """Contiguous blocks ``[num_blocks, block_size, num_kv_heads, head_dim]`` reinterpreted as each
    block's ``[num_kv_heads, head_dim, block_size]``, shown in the same logical order: a value cache
    whose tokens are adjacent for each head and dim (see `KVCache`)."""
    num_blocks, block_size, heads, dim = blocks.shape
    return blocks.view(num_blocks, heads, dim, block_size).permute(0, 3, 1, 2)


@dataclass
class LayerKVCache:
    """One layer's keys and values, in the layout of its backend (blocks first).

    `k_scale`/`v_scale` ([num_kv_heads] float32) dequantize a quantized cache; None otherwise.
    `k_offset` ([num_kv_heads, head_dim] float32) is subtracted from keys before they are
    quantized: every score of a query moves by the same amount, which softmax ignores, so
    readers need not add it back.

    Readers of a quantized cache take each query's own token from the step's K/V instead (the key
    less `k_offset`): it is the token a query often attends to most, and it is in hand unrounded.

    `k_sink`/`v_sink` ([num_sink_blocks, block_size, num_kv_heads, head_dim] float16, FP8 only):
    blocks 0..S-1 of the cache, which hold sequences' first tokens (`BlockManager`), kept in
    float16 in the same units as the FP8 entries (scaled, keys less their offset). The first tokens
    are the attention sinks: most of the attention mass and large keys, where e4m3's 3-bit
    mantissa costs the most. Writers store these blocks' entries here as well; readers take them
    from here.
    """

    key: torch.Tensor
    value: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_offset: torch.Tensor | None = None
    k_sink: torch.Tensor | None = None
    v_sink: torch.Tensor | None = None

    def own_kv(self, key: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The attention ops' keyword arguments that hand a quantized cache's readers the step's own K/V
        (``new_key``, ``new_value``, ``k_offset``); none for a cache in the model's dtype."""
        return dict(new_key=key, new_value=value, k_offset=self.k_offset) if self.k_scale is not None else {}


class KVCache:
    """All layers' caches in one allocation `[num_layers, 2, *layer_shape]`, blocks first in each;
    with `num_sink_blocks` S, float16 copies of blocks 0..S-1 beside it (see `LayerKVCache`).

    With `value_dim_major` (an FP8 cache) each value block is stored as `[num_kv_heads, head_dim,
    block_size]`, seen through `dim_major` in the usual logical order: attention's P @ V wants a
    tile's tokens adjacent for each dim, which 16-bit caches get from a transposing ldmatrix and
    8-bit ones do not (compiled for sm90, the FP8 decode loop spent 128 scalar shared-memory loads
    per tile regrouping V's bytes). Whole-block copies are the same either way."""

    def __init__(self, num_layers: int, layer_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 num_sink_blocks: int = 0, value_dim_major: bool = False):
        self.data = torch.zeros((num_layers, 2, *layer_shape), dtype=dtype, device=device)
        self.num_sink_blocks = num_sink_blocks
        # one more block: where copy_blocks sends the pairs that are not sink blocks
        self.sinks = torch.zeros((num_layers, 2, num_sink_blocks + 1, *layer_shape[1:]), dtype=torch.float16,
                                 device=device) if num_sink_blocks else None
        values = dim_major if value_dim_major else (lambda blocks: blocks)
        self.layers = [LayerKVCache(self.data[i, 0], values(self.data[i, 1])) for i in range(num_layers)]
        if self.sinks is not None:
            for layer, sink in zip(self.layers, self.sinks):
                layer.k_sink, layer.v_sink = sink[0, :num_sink_blocks], values(sink[1])[:num_sink_blocks]

    @property
    def num_bytes(self) -> int:
        sinks = self.sinks.numel() * self.sinks.element_size() if self.sinks is not None else 0
        return self.data.numel() * self.data.element_size() + sinks

    def set_scales(self, k_scales: torch.Tensor, v_scales: torch.Tensor, k_offsets: torch.Tensor) -> None:
        """Per-layer, per-KV-head dequantization scales, [num_layers, num_kv_heads] float32, and
        key offsets, [num_layers, num_kv_heads, head_dim] float32."""
        for layer, k, v, offset in zip(self.layers, k_scales, v_scales, k_offsets):
            layer.k_scale, layer.v_scale, layer.k_offset = k.contiguous(), v.contiguous(), offset.contiguous()

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: block src[i] -> dst[i] in every layer, keys and values (a sink block's
        copy is a sink block: `BlockManager`)."""
        self.data[:, :, dst] = self.data[:, :, src]
        if self.sinks is not None:
            spare = self.num_sink_blocks
            self.sinks[:, :, torch.where(src < spare, dst, spare)] = self.sinks[:, :, src.clamp(max=spare)]
