"""The Triton K/V store against plain indexing, for half, float32 and FP8 caches."""
from __future__ import annotations

import pytest
import torch
import triton_cpu  # noqa: F401  (before the kernels: interpreter on CPU)

from nanovllm.attention.kv_cache import dim_major
from nanovllm.attention.ops import triton_store_kv
from nanovllm.attention.ops.triton_store_kv import store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def expected_cache(cache, new, slots, scale=None, offset=None):
    """``cache`` with ``new`` written at ``slots`` (-1 skipped), quantized like the kernel when FP8
    (less ``offset`` first, when given)."""
    out = cache.clone().flatten(0, 1)
    keep = slots >= 0
    if scale is not None:
        new = ((new.float() - (offset if offset is not None else 0.0)) / scale[:, None]).clamp(-448, 448)
    out.view(torch.uint8 if cache.dtype == FP8 else cache.dtype)[slots[keep]] = (
        new[keep].to(cache.dtype).view(torch.uint8) if cache.dtype == FP8 else new[keep].to(cache.dtype))
    return out.view_as(cache)


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype,cache_dtype,per_head_max", [
    (torch.float32, torch.float32, 4096), (torch.bfloat16, torch.bfloat16, 4096), (torch.float16, torch.float16, 4096),
    (torch.bfloat16, FP8, 4096), (torch.float32, FP8, 4096), (torch.bfloat16, FP8, 0)], ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (3, 128, 32)])
def test_store_kv_writes_slots(dtype, cache_dtype, per_head_max, num_kv_heads, head_dim, block_size, monkeypatch):
    """Both grids: an FP8 cache's decode-sized stores take a program per (token, KV head), larger ones
    (forced here with a limit of 0) and every other cache a program per token."""
    monkeypatch.setattr(triton_store_kv, "FP8_PER_HEAD_MAX_PROGRAMS", per_head_max)
    torch.manual_seed(0)
    shape = (5, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    value_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    key = torch.randn(7, num_kv_heads, head_dim, device=DEVICE).to(dtype) * 4
    value = torch.randn(7, num_kv_heads, head_dim, device=DEVICE).to(dtype) * 4
    key[0, 0, 0] = 1e4  # beyond fp8's range once scaled: clamped to 448
    slots = torch.randperm(5 * block_size, device=DEVICE)[:7]
    slots[[2, 5]] = -1  # padding tokens
    scales = {}
    if cache_dtype == FP8:
        scales = dict(k_scale=torch.rand(num_kv_heads, device=DEVICE) * 0.05 + 0.01,
                      v_scale=torch.rand(num_kv_heads, device=DEVICE) * 0.05 + 0.01,
                      k_offset=torch.randn(num_kv_heads, head_dim, device=DEVICE) * 3)
    want_k = expected_cache(key_cache, key, slots, scales.get("k_scale"), scales.get("k_offset"))
    want_v = expected_cache(value_cache, value, slots, scales.get("v_scale"))
    store_kv(key, value, key_cache, value_cache, slots, **scales)
    assert same_bits(key_cache, want_k) and same_bits(value_cache, want_v)


def test_store_kv_strided_cache_and_input():
    """A cache that is a slice of a larger allocation and K/V sliced from a fused qkv projection."""
    torch.manual_seed(1)
    both = torch.randn(2, 4, 16, 2, 64, device=DEVICE)
    key_cache, value_cache = both[0], both[1]
    qkv = torch.randn(3, 4, 2, 64, device=DEVICE)  # [tokens, q/k/v + 1, heads, dim]
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([3, 40, 63], device=DEVICE)
    want_k, want_v = expected_cache(key_cache, key, slots), expected_cache(value_cache, value, slots)
    store_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)


@pytest.mark.parametrize("per_head_max", [4096, 0], ids=["per-head", "per-token"])
def test_store_kv_into_dim_major_fp8_values_writes_no_nan(per_head_max, monkeypatch):
    """An FP8 value cache stored dim-major in each block (`kv_cache.dim_major`, the engine's FP8 layout):
    the same logical entries as indexing writes, and a NaN value stored as 0 (readers load its
    blocks whole and weigh entries past a length by 0, which a NaN would defeat); with both grids."""
    monkeypatch.setattr(triton_store_kv, "FP8_PER_HEAD_MAX_PROGRAMS", per_head_max)
    torch.manual_seed(2)
    shape = (4, 16, 2, 64)
    key_cache = torch.zeros(shape, device=DEVICE).to(FP8)
    value_cache = dim_major(torch.zeros(shape, device=DEVICE).to(FP8))
    key, value = (torch.randn(3, 2, 64, device=DEVICE) * 4 for _ in range(2))
    value[1, 0, 5] = float("nan")
    slots = torch.tensor([0, 17, 63], device=DEVICE)
    scales = dict(k_scale=torch.full((2,), 0.02, device=DEVICE), v_scale=torch.full((2,), 0.03, device=DEVICE))
    want_v = expected_cache(value_cache.contiguous(), torch.nan_to_num(value, nan=0.0), slots, scales["v_scale"])
    store_kv(key, value, key_cache, value_cache, slots, **scales)
    assert value_cache.stride()[1:] == (1, 64 * 16, 16) and same_bits(value_cache.contiguous(), want_v)
    assert not torch.isnan(value_cache.float()).any()


def test_store_kv_rejects_bad_input():
    cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    key = torch.zeros(3, 2, 64, device=DEVICE)
    slots = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        store_kv(key, key, cache.to(FP8), cache.to(FP8), slots)
    with pytest.raises(ValueError, match="k_scale must be float32"):
        store_kv(key, key, cache.to(FP8), cache.to(FP8), slots, torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="k_offset must be"):
        store_kv(key, key, cache, cache, slots, k_offset=torch.zeros(2, 64, device=DEVICE))  # not an FP8 cache
    with pytest.raises(ValueError, match="k_offset must be"):
        fp8, ones = cache.to(FP8), torch.ones(2, device=DEVICE)
        store_kv(key, key, fp8, fp8, slots, ones, ones, torch.zeros(2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="key and value must be"):
        store_kv(key[:, :1], key[:, :1], cache, cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, key, cache, cache, slots[:2])
    with pytest.raises(ValueError, match="power of two"):
        store_kv(key, key, cache[:, :8], cache[:, :8], slots)
