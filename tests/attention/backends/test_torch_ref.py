"""The torch reference backend's cache write (CPU), FP8 key offsets included."""
import torch

from nanovllm.attention.backends.torch_ref import TorchRefBackend
from nanovllm.attention.kv_cache import FP8_MAX, LayerKVCache
from nanovllm.attention.metadata import build_layout


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


def test_fp8_key_offset_leaves_attention_unchanged_and_keeps_precision():
    """Keys with a large per-channel offset: stored less the offset, attention over the FP8 cache
    still equals exact float32 attention (softmax ignores q . offset), and within a fraction of
    the error of quantizing the raw keys, whose scale the offset inflates."""
    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, dim, block = 48, 4, 2, 64, 16
    q = torch.randn(n, heads, dim, generator=g)
    v = torch.randn(n, kv_heads, dim, generator=g)
    offset = torch.randn(kv_heads, dim, generator=g) * 6
    k = torch.randn(n, kv_heads, dim, generator=g) + offset
    layout = build_layout([n], [n], [list(range(n // block))], block)
    _, meta = layout.metadata([torch.from_numpy(a) for a in layout.arrays()])
    backend, scale = TorchRefBackend(), dim**-0.5

    def attend(cache: LayerKVCache) -> torch.Tensor:
        backend.write_kv(k, v, cache, meta.slot_mapping)
        return backend.forward(q, k, v, cache, meta, scale)

    shape = (n // block, block, kv_heads, dim)
    exact = attend(LayerKVCache(torch.zeros(shape), torch.zeros(shape)))

    def fp8(k_offset: torch.Tensor | None) -> torch.Tensor:
        shifted = k - (k_offset if k_offset is not None else 0)
        k_scale, v_scale = shifted.abs().amax(dim=(0, 2)) / FP8_MAX, v.abs().amax(dim=(0, 2)) / FP8_MAX
        zeros = torch.zeros(shape, dtype=torch.float8_e4m3fn)
        return attend(LayerKVCache(zeros, zeros.clone(), k_scale, v_scale, k_offset))

    def rel_err(out: torch.Tensor) -> float:
        return ((out - exact).norm() / exact.norm()).item()

    with_offset, raw = rel_err(fp8(offset.contiguous())), rel_err(fp8(None))
    print(f"relative error with the key offset {with_offset:.4f}, raw keys {raw:.4f}")
    assert with_offset < 0.05 and with_offset < raw / 3, (with_offset, raw)
