"""Backend choice and the torch backend's cache write (CPU)."""
import pytest
import torch

from nanovllm.layers.attention import TorchBackend, select_backend


def test_auto_on_cpu_is_torch_reference():
    assert isinstance(select_backend("auto", torch.device("cpu"), torch.float32), TorchBackend)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cuda", torch.float32)])
def test_flash_attn_needs_cuda_and_half(device, dtype):
    with pytest.raises(ValueError, match="flash_attn"):
        select_backend("flash_attn", torch.device(device), dtype)


def test_store_kvcache_writes_slots_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    k_cache = torch.full((4, 8, 2, 16), float("nan"))
    v_cache = torch.full((4, 8, 2, 16), float("nan"))
    key, value = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, 17, -1, 30, 8])
    TorchBackend().store_kvcache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[t]) and torch.equal(flat_v[s], value[t])
    assert torch.isnan(flat_k).all(-1).all(-1).sum() == 32 - 4
