"""The KV cache: one allocation for every layer, its copy-on-write, and an FP8 cache's sink blocks."""
from __future__ import annotations

import torch

from nanovllm.attention.kv_cache import KVCache


def test_copy_blocks_copies_every_layer_and_sink_blocks_only_into_sink_blocks():
    torch.manual_seed(0)
    cache = KVCache(3, (8, 4, 2, 16), torch.float8_e4m3fn, torch.device("cpu"), num_sink_blocks=3)
    assert cache.sinks.dtype == torch.float16 and cache.layers[2].k_sink.shape == (3, 4, 2, 16)
    assert cache.layers[1].v_sink.data_ptr() == cache.sinks[1, 1].data_ptr()  # views of one allocation
    cache.data.copy_(torch.randn(cache.data.shape).to(torch.float8_e4m3fn))
    cache.sinks.normal_()
    data, sinks = cache.data.clone(), cache.sinks.clone()
    src, dst = torch.tensor([0, 5, 4]), torch.tensor([1, 6, 7])  # a sink block's copy; two others
    cache.copy_blocks(src, dst)
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(cache.data[:, :, d].view(torch.uint8), data[:, :, s].view(torch.uint8))
    assert torch.equal(cache.sinks[:, :, 1], sinks[:, :, 0])  # the sink block's float16 copy moved too
    assert torch.equal(cache.sinks[:, :, [0, 2]], sinks[:, :, [0, 2]])  # no other sink block changed
    assert cache.num_bytes == cache.data.numel() + cache.sinks.numel() * 2


def test_no_sink_blocks_by_default():
    cache = KVCache(2, (4, 4, 2, 16), torch.bfloat16, torch.device("cpu"))
    assert cache.sinks is None and cache.layers[0].k_sink is None


def test_dim_major_values_keep_their_logical_order_and_copy_with_their_blocks():
    """A dim-major value cache (the FP8 layout): each block's bytes hold [heads, dims, tokens], while
    the layer's `value` reads in the usual [blocks, tokens, heads, dims] order, sinks alike."""
    cache = KVCache(2, (6, 4, 2, 8), torch.float16, torch.device("cpu"), num_sink_blocks=2, value_dim_major=True)
    value, key = cache.layers[1].value, cache.layers[1].key
    assert value.shape == key.shape == (6, 4, 2, 8) and value.stride() == (64, 1, 32, 4) and key.stride(-1) == 1
    assert cache.layers[1].v_sink.stride() == value.stride()
    value[3, 1, 0, 5] = 7.0  # token 1, head 0, dim 5 of block 3: byte (0 * 8 + 5) * 4 + 1 of the block
    assert cache.data[1, 1, 3].flatten()[(0 * 8 + 5) * 4 + 1] == 7.0
    cache.copy_blocks(torch.tensor([3]), torch.tensor([4]))
    assert value[4, 1, 0, 5] == 7.0
