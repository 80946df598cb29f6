"""Random paged K/V cases for the kernel tests."""
from __future__ import annotations

import torch

from nanovllm.attention.ops.paged_attention_ref import dequantize


class PagedKV:
    """Random K/V for sequences of ``lens`` tokens scattered into randomly permuted physical blocks.

    Slots no sequence owns hold NaN and block-table entries past a sequence's last block point at
    other sequences' blocks, so a kernel that reads past a length poisons its output. With
    ``fp8`` the cache is quantized with random per-KV-head scales (``k_scale``/``v_scale``).
    """

    def __init__(self, lens, num_kv_heads, head_dim, block_size, dtype, device, fp8=False, extra_cols=1):
        used = [-(-n // block_size) for n in lens]
        num_blocks = sum(used) + 2
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        keys, values = torch.randn(shape, device=device), torch.randn(shape, device=device)
        physical = torch.randperm(num_blocks, device=device).to(torch.int32)
        cols = max(used, default=0) + extra_cols
        self.block_tables = physical[torch.randint(num_blocks, (len(lens), cols), device=device)]  # padding
        live = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        start = 0
        for i, (n, nb) in enumerate(zip(lens, used)):
            self.block_tables[i, :nb] = physical[start : start + nb]
            live.view(-1)[(physical[start : start + nb].long()[:, None] * block_size
                           + torch.arange(block_size, device=device)).flatten()[:n]] = True
            start += nb
        self.k_scale = self.v_scale = None
        if fp8:
            self.k_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            self.v_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            keys = (keys / self.k_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            values = (values / self.v_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            keys, values = keys.to(dtype), values.to(dtype)
        dead = ~live
        keys.view(torch.uint8 if fp8 else keys.dtype)[dead] = 0x7F if fp8 else float("nan")  # 0x7F: fp8 NaN
        values.view(torch.uint8 if fp8 else values.dtype)[dead] = 0x7F if fp8 else float("nan")
        self.key_cache, self.value_cache = keys, values
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.block_size = block_size

    def float_caches(self):
        """The caches as the float32 reference reads them (dequantized when FP8)."""
        return (dequantize(self.key_cache, self.k_scale).float(), dequantize(self.value_cache, self.v_scale).float())
