"""The Triton kernels of `layers/fused_kernels.py` against the torch definitions they replace on CUDA
(Triton's interpreter on CPU), on fresh random inputs: strided q/k views as the fused QKV output
gives them, partial blocks (dims that are no power of two), one token and several."""
from __future__ import annotations

import pytest
import torch

from nanovllm.layers import fused_kernels
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.layernorm import add_rms_norm, rms_norm
from nanovllm.layers.rotary_embedding import apply_rotary, hadamard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: to a few ulps; bfloat16: to two ulps (the same float32 math, rounded to bf16 twice on the
    way, where the last float32 bits of a sum or an exp may differ)."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    tol = 1e-5 if got.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q and k as the attention layer slices them out of one fused projection (strided views)."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 96), (70, 64)])  # 70: programs of 32 rows, the last partial
def test_rms_norm_and_residual_add(dtype, tokens, hidden):
    torch.manual_seed(tokens + hidden)
    x, residual = (torch.randn(tokens, hidden, device=DEVICE).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    close(fused_kernels.rms_norm(x, weight, 1e-6), rms_norm.__wrapped__(x, weight, 1e-6))
    got, got_residual = fused_kernels.add_rms_norm(x, residual, weight, 1e-6)
    want, want_residual = add_rms_norm.__wrapped__(x, residual, weight, 1e-6)
    close(got, want)
    close(got_residual, want_residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_strided_q_and_k(dtype):
    torch.manual_seed(1)
    q, k = qkv_views(3, 4, 2, 32, dtype)
    weight = (1 + 0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    for x in (q, k):
        assert not x.is_contiguous()
        close(fused_kernels.rms_norm(x, weight, 1e-5), rms_norm.__wrapped__(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inner", [(1, 48), (4, 1100)])  # 1100: two column blocks, the second partial
def test_silu_and_mul(dtype, tokens, inner):
    torch.manual_seed(inner)
    x = (2 * torch.randn(tokens, 2 * inner, device=DEVICE)).to(dtype)
    close(fused_kernels.silu_and_mul(x), silu_and_mul.__wrapped__(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,head_dim", [(1, 64), (6, 80), (11, 64)])  # 80: half a head (40) is no power of
# two; 11 x 6 heads: programs of 64 rows, q and k rows mixed in one, the last partial
def test_rotary_on_strided_q_and_k(dtype, tokens, head_dim):
    torch.manual_seed(tokens * head_dim)
    q, k = qkv_views(tokens, 4, 2, head_dim, dtype)
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), torch.rand(head_dim // 2))
    emb = torch.cat((freqs, freqs), dim=-1)
    cache = torch.stack((emb.cos(), emb.sin())).to(DEVICE)
    positions = torch.randint(0, 512, (tokens,), device=DEVICE)
    got_q, got_k = fused_kernels.apply_rotary(positions, q, k, cache)
    want_q, want_k = apply_rotary.__wrapped__(positions, q, k, cache)
    close(got_q, want_q)
    close(got_k, want_k)


def random_mixes(kv_heads: int, head_dim: int) -> torch.Tensor:
    """A random orthonormal [head_dim, head_dim] matrix per KV head (Q of a QR), float32."""
    return torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim))[0].contiguous().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,head_dim", [(1, 64), (11, 128), (1030, 64), (5, 80), (3, 16)])  # 1,030: 32
# tokens a program; 80 and 16: halves of 40 and 8 padded to tiles of 64 and 16
def test_rotary_with_a_mix_per_kv_head(dtype, tokens, head_dim):
    """The FP8 cache's rotations after RoPE, one per KV head: the kernel as the torch definition, and
    q . k unchanged for each query head and its KV head (4 query heads over 2 KV heads)."""
    torch.manual_seed(tokens + head_dim)
    q, k = qkv_views(tokens, 4, 2, head_dim, dtype)
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), torch.rand(head_dim // 2))
    emb = torch.cat((freqs, freqs), dim=-1)
    cache = torch.stack((emb.cos(), emb.sin())).to(DEVICE)
    positions = torch.randint(0, 64, (tokens,), device=DEVICE)
    mix = random_mixes(2, head_dim)
    kept = mix.to(torch.float32 if dtype == torch.float32 else torch.float16)  # as `RotaryEmbedding.set_mix`
    got_q, got_k = fused_kernels.apply_rotary(positions, q, k, cache, kept)
    want_q, want_k = apply_rotary.__wrapped__(positions, q, k, cache, kept)
    close(got_q, want_q)
    close(got_k, want_k)
    plain_q, plain_k = apply_rotary.__wrapped__(positions, q.float(), k.float(), cache)
    mixed_q, mixed_k = apply_rotary.__wrapped__(positions, q.float(), k.float(), cache, mix)
    torch.testing.assert_close(mixed_k[:, 1], plain_k[:, 1] @ mix[1])
    torch.testing.assert_close(mixed_q[:, 2:], plain_q[:, 2:] @ mix[1])  # query heads 2 and 3 read KV head 1
    scores = torch.einsum("tkgd,tkd->tkg", plain_q.view(tokens, 2, 2, head_dim), plain_k)
    mixed = torch.einsum("tkgd,tkd->tkg", mixed_q.view(tokens, 2, 2, head_dim), mixed_k)
    torch.testing.assert_close(mixed, scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,head_dim,mixed", [(1, 64, False), (11, 80, False), (5, 64, True)])
def test_rotary_with_qk_norm(dtype, tokens, head_dim, mixed):
    """Qwen3's per-head RMSNorm of q and k (each its own weight) in the rotary kernel: as the torch
    definition, which is the norm and then RoPE."""
    torch.manual_seed(tokens + head_dim)
    q, k = qkv_views(tokens, 4, 2, head_dim, dtype)
    q, k = 3 * q, k / 3  # unit-free rows, so that a norm that is skipped or swapped shows
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), torch.rand(head_dim // 2))
    emb = torch.cat((freqs, freqs), dim=-1)
    cache = torch.stack((emb.cos(), emb.sin())).to(DEVICE)
    positions = torch.randint(0, 64, (tokens,), device=DEVICE)
    mix = random_mixes(2, head_dim) if mixed else None
    norm = tuple((1 + 0.3 * torch.randn(head_dim, device=DEVICE)).to(dtype) for _ in range(2)) + (1e-6,)
    got_q, got_k = fused_kernels.apply_rotary(positions, q, k, cache, mix, norm)
    want_q, want_k = apply_rotary.__wrapped__(positions, q, k, cache, mix, norm)
    close(got_q, want_q)
    close(got_k, want_k)
    normed = rms_norm.__wrapped__(q, norm[0], 1e-6), rms_norm.__wrapped__(k, norm[1], 1e-6)
    close(want_q, apply_rotary.__wrapped__(positions, normed[0], normed[1], cache, mix)[0])


def test_hadamard_is_orthonormal_and_wants_a_power_of_two():
    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), rtol=0, atol=1e-6)
    torch.testing.assert_close(h, h.T)
    with pytest.raises(ValueError, match="power-of-two order, got 80"):
        hadamard(80)


def test_torch_definitions_run_off_cuda():
    """The layers dispatch on the tensor's device: on CPU the torch definition runs."""
    x = torch.randn(2, 16)
    assert torch.equal(silu_and_mul(x), silu_and_mul.__wrapped__(x))
