"""The torch reference backend's cache write (CPU)."""
import torch

from nanovllm.attention.backends.torch_ref import TorchRefBackend
from nanovllm.attention.kv_cache import LayerKVCache


def test_write_kv_writes_slots_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    cache = LayerKVCache(torch.full((4, 8, 2, 16), float("nan")), torch.full((4, 8, 2, 16), float("nan")))
    key, value = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, 17, -1, 30, 8])
    TorchRefBackend().write_kv(key, value, cache, slots)
    flat_k, flat_v = cache.key.view(-1, 2, 16), cache.value.view(-1, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[t]) and torch.equal(flat_v[s], value[t])
    assert torch.isnan(flat_k).all(-1).all(-1).sum() == 32 - 4
