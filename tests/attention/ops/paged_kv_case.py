"""Random paged K/V cases for the kernel tests."""
from __future__ import annotations

import torch

from nanovllm.attention.kv_cache import dim_major
from nanovllm.attention.ops.paged_attention_ref import dequantize


class PagedKV:
    """Random K/V for sequences of ``lens`` tokens scattered into randomly permuted physical blocks.

    Slots no sequence owns hold NaN (FP8 values: 448, their largest entry) and block-table entries
    past a sequence's last block point at other sequences' blocks, so a kernel that reads past a
    length, or gives such an entry weight, spoils its output. With
    ``fp8`` the cache is quantized with random per-KV-head scales (``k_scale``/``v_scale``); with
    ``sinks`` too, every sequence's first block is one of the first ``num_sink_blocks`` blocks,
    whose entries are also kept unquantized in float16 (``k_sink``/``v_sink``, see ``LayerKVCache``).
    """

    def __init__(self, lens, num_kv_heads, head_dim, block_size, dtype, device, fp8=False, extra_cols=1,
                 sinks=False):
        assert fp8 or not sinks
        used = [-(-n // block_size) for n in lens]
        self.num_sink_blocks = sum(n > 0 for n in used) + 1 if sinks else 0
        num_blocks = sum(used) + 2 + self.num_sink_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        keys, values = torch.randn(shape, device=device), torch.randn(shape, device=device)
        firsts = torch.randperm(self.num_sink_blocks, device=device).to(torch.int32).tolist()
        physical = (torch.randperm(num_blocks - self.num_sink_blocks, device=device) + self.num_sink_blocks).int()
        cols = max(used, default=0) + extra_cols
        self.block_tables = physical[torch.randint(len(physical), (len(lens), cols), device=device)]  # padding
        live = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        start = 0
        for i, (n, nb) in enumerate(zip(lens, used)):
            blocks = physical[start : start + nb]
            if sinks and nb:
                blocks = torch.cat([blocks.new_tensor([firsts.pop()]), physical[start : start + nb - 1]])
            self.block_tables[i, :nb] = blocks
            live.view(-1)[(blocks.long()[:, None] * block_size + torch.arange(block_size, device=device))
                          .flatten()[:n]] = True
            start += len(blocks) - (sinks and nb > 0)
        self.k_scale = self.v_scale = self.k_sink = self.v_sink = None
        dead = ~live
        if fp8:
            self.k_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            self.v_scale = torch.rand(num_kv_heads, device=device) * 0.02 + 0.005
            keys, values = keys / self.k_scale[:, None], values / self.v_scale[:, None]
            if sinks:
                self.k_sink, self.v_sink = (x[: self.num_sink_blocks].half() for x in (keys, values))
                for sink in (self.k_sink, self.v_sink):
                    sink[dead[: self.num_sink_blocks]] = float("nan")
            keys = keys.clamp(-448, 448).to(torch.float8_e4m3fn)
            values = values.clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            keys, values = keys.to(dtype), values.to(dtype)
        keys.view(torch.uint8 if fp8 else keys.dtype)[dead] = 0x7F if fp8 else float("nan")  # 0x7F: fp8 NaN
        # FP8 values: the largest finite entry, not NaN. Kernels read a dim-major FP8 value cache's blocks
        # whole (the stores never write NaN), so dead entries there must weigh 0, not be skipped.
        values.view(torch.uint8 if fp8 else values.dtype)[dead] = 0x7E if fp8 else float("nan")
        if fp8:  # values dim-major in each block, as the engine's FP8 cache keeps them (`kv_cache.dim_major`)
            values = dim_major(values.permute(0, 2, 3, 1).contiguous().view(values.shape))
            if sinks:
                self.v_sink = dim_major(self.v_sink.permute(0, 2, 3, 1).contiguous().view(self.v_sink.shape))
        self.key_cache, self.value_cache = keys, values
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.block_size = block_size

    def float_caches(self):
        """The caches as the float32 reference reads them (dequantized when FP8, sink blocks from
        their float16 copies)."""
        caches = []
        for cache, sink, scale in ((self.key_cache, self.k_sink, self.k_scale),
                                   (self.value_cache, self.v_sink, self.v_scale)):
            cache = cache.float()
            if sink is not None:
                cache[: self.num_sink_blocks] = sink.float()
            caches.append(dequantize(cache, scale).float())
        return tuple(caches)
