"""Rotary position embedding (neox layout: rotate the two halves), with llama3 scaling."""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers import fused_kernels
from nanovllm.layers.layernorm import rms_norm
from nanovllm.utils.fusion import on_cuda_use


def rope_parameters(config: PretrainedConfig) -> dict:
    """rope type, theta and scaling of a config, old style (rope_theta/rope_scaling) or new."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of order n (a power of two), float32: symmetric, its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x.float() * cos + rotated.float() * sin
    if mix is not None:  # head h of x takes matrix h // (heads / kv_heads)
        out = torch.einsum("thd,hde->the", out, mix.float().repeat_interleave(x.shape[1] // mix.shape[0], dim=0))
    return out.to(x.dtype).contiguous()


@on_cuda_use(fused_kernels.apply_rotary)
def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                 mix: torch.Tensor | None = None,
                 norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k; then, with `mix` ([kv_heads, head_dim, head_dim], orthonormal, float32 or float16), each
    head times its KV head's matrix (query head h: h // (heads / kv_heads)), which leaves every q . k as it is.
    With `norm` = (q's weight, k's weight, eps), q and k go through a per-head RMSNorm first (Qwen3),
    in the same kernel on CUDA."""
    if norm is not None:
        q, k = rms_norm(q, norm[0], norm[2]), rms_norm(k, norm[1], norm[2])
    cos, sin = cos_sin_cache[:, positions].unsqueeze(-2)
    return _rotate(q, cos, sin, mix), _rotate(k, cos, sin, mix)


class RotaryEmbedding(nn.Module):
    """RoPE, and for an FP8 KV cache (`set_mix`) an orthonormal rotation of q and k after it, one per KV head.

    The rotation leaves every q . k as it is, and so attention, but it decides how e4m3's relative
    rounding errors of a stored key reach the scores: `kv_calibration.key_rotations` chooses it from
    the calibration queries and keys (starting from a Hadamard matrix, which spreads a key's few
    outsized channels over all of its dims). Values are not rotated: that measured no better."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        inv_freq = _inv_freq(head_dim, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin_cache", torch.stack((emb.cos(), emb.sin())), persistent=False)
        self.mix: torch.Tensor | None = None

    def set_mix(self, mix: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        """Rotate q and k after RoPE by `mix` ([kv_heads, head_dim, head_dim], orthonormal) from now on; None:
        not at all. For a 16-bit model `dtype` the matrices are kept in float16 (as many mantissa bits as
        the tf32 the kernel would round float32 to, at half the bytes); a float32 model keeps float32."""
        keep = torch.float32 if dtype == torch.float32 else torch.float16
        self.mix = None if mix is None else mix.to(self.cos_sin_cache.device, keep).contiguous()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]; `norm`: see `apply_rotary`."""
        return apply_rotary(positions, q, k, self.cos_sin_cache, self.mix, norm)
