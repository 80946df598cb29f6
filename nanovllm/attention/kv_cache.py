"""The paged KV cache: one tensor for every layer, a view per layer handed to attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Config.kv_cache_dtype -> the cache's element type ("auto": the model's dtype)
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


@dataclass
class LayerKVCache:
    """One layer's keys and values, in the layout of its backend (blocks first).

    `k_scale`/`v_scale` ([num_kv_heads] float32) dequantize a quantized cache; None otherwise.
    `k_offset` ([num_kv_heads, head_dim] float32) is subtracted from keys before they are
    quantized: every score of a query moves by the same amount, which softmax ignores, so
    readers need not add it back.
    """

    key: torch.Tensor
    value: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_offset: torch.Tensor | None = None


class KVCache:
    """All layers' caches in one allocation `[num_layers, 2, *layer_shape]`, blocks first in each."""

    def __init__(self, num_layers: int, layer_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.data = torch.zeros((num_layers, 2, *layer_shape), dtype=dtype, device=device)
        self.layers = [LayerKVCache(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def set_scales(self, k_scales: torch.Tensor, v_scales: torch.Tensor, k_offsets: torch.Tensor) -> None:
        """Per-layer, per-KV-head dequantization scales, [num_layers, num_kv_heads] float32, and
        key offsets, [num_layers, num_kv_heads, head_dim] float32."""
        for layer, k, v, offset in zip(self.layers, k_scales, v_scales, k_offsets):
            layer.k_scale, layer.v_scale, layer.k_offset = k.contiguous(), v.contiguous(), offset.contiguous()

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: block src[i] -> dst[i] in every layer, keys and values."""
        self.data[:, :, dst] = self.data[:, :, src]
