"""FP8 KV-cache scales: per layer and per KV head, from the K/V the model produces on calibration text.

At startup the runner runs one forward over a calibration prompt (this text through the
model's tokenizer; seeded random ids without one) with a cache in the model's dtype and
records each layer's Q, K and V. Keys are stored less a per-KV-head, per-channel offset: a
query's scores against every key then shift by the same q . offset, which softmax ignores, so
attention is unchanged while e4m3's 3-bit mantissa is spent on what varies between keys rather
than on a large constant part (keys carry one in their low-frequency rotary channels). The
offset is the keys' mean weighted by the attention each key receives on the calibration text
(`attended_key_mean`): the keys that queries look at most, the attention sinks above all, are
then stored closest to exact. scale = amax * HEADROOM / 448 per KV head, amax of the offset keys
and of the values, so a value HEADROOM times the largest one seen still fits before it
saturates. Scales and offsets are fixed from then on: the cache never needs requantizing.

On SmolLM2-135M-Instruct, teacher-forced, FP8 against the model-dtype cache (Hadamard-rotated
keys): no offset 96.25 % top-1 agreement (float32, 320 positions); the plain mean 97.5 % there,
and over 2,048 positions 97.2 % / mean |Δ logprob| 0.033 in float32 and over 3,072 positions
96.3 % / 0.044 in bfloat16 (the GPU test's setup, run on CPU; the H200 gave 96.0 % / 0.042); the
attended mean 97.7 % / 0.032 and 96.8 % / 0.039 on the same two sets. HEADROOM 1.0 and 2.0
measured alike.

Queries and keys are also rotated after RoPE, per KV head, by an orthonormal matrix fitted to the
calibration tokens (`key_rotations`; the rotary kernel applies it, see `RotaryEmbedding`): q . k
is unchanged, but which dims carry the keys' spread decides how far e4m3's relative rounding errors
move the scores, and a Hadamard matrix, where the fit starts, only spreads a key's outsized
channels evenly. Against the Hadamard matrix alone: the CPU test (float32, 2,048 positions) 97.7 %
/ 0.032 -> 98.1 % / 0.022; the GPU test's setup on CPU 96.8 % / 0.039 -> 97.2 % / 0.033; the GPU
test on the H200 (call DE, both trees in one call) 96.5 % / 0.038 -> 96.9 % / 0.033. The fit adds
~0.6 s to an FP8 startup on the H200 (100 Adam steps on every layer's heads at once), ~6 s for
SmolLM2-135M on a 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.attention.kv_cache import FP8_MAX

HEADROOM = 2.0
MIN_AMAX = 1e-4  # a head that only ever produced zeros still gets a usable, logged scale
ROTATION_STEPS, ROTATION_LR = 100, 0.01  # `key_rotations`' optimizer

CALIBRATION_TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined
movable metal type, oil-based ink and a wooden screw press. Within fifty years presses were running
in more than two hundred European cities, and the price of books fell by an order of magnitude.
Q: What is 17 multiplied by 23? A: 17 * 23 = 391. Q: Write a Python function that reverses a list.
def reverse(items):
    return items[::-1]
User: Can you summarise the plot of Hamlet in two sentences?
Assistant: Prince Hamlet seeks revenge on his uncle Claudius, who murdered Hamlet's father and married
his mother. His hesitation and feigned madness lead to a chain of deaths, his own included.
Les marchés financiers ont réagi vivement à l'annonce; die Zinsen stiegen um 0,25 Prozentpunkte.
{"name": "sensor-7", "temperature": 21.5, "humidity": 0.43, "tags": ["indoor", "calibrated"]}
"""


def calibration_token_ids(tokenizer: object | None, vocab_size: int, seed: int, length: int = 512) -> list[int]:
    """The calibration prompt: CALIBRATION_TEXT repeated to `length` tokens, or random ids without a tokenizer."""
    if tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()
    ids = tokenizer.encode(CALIBRATION_TEXT)
    return (ids * (length // len(ids) + 1))[:length]


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """[num_layers, num_kv_heads] absolute maxima -> float32 dequantization scales."""
    return (amax.float().clamp(min=MIN_AMAX) * HEADROOM / FP8_MAX).contiguous()


@dataclass
class FP8Calibration:
    k_scales: torch.Tensor  # [num_layers, num_kv_heads] float32
    v_scales: torch.Tensor  # [num_layers, num_kv_heads] float32
    k_offsets: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32, subtracted from keys on write
    k_rotations: torch.Tensor  # [num_layers, num_kv_heads, head_dim, head_dim] float32 orthonormal: keys (and
    # their queries) as calibrated times this, `key_rotations`; the scales and offsets are of the rotated keys


def attended_key_mean(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """[num_kv_heads, head_dim]: each KV head's keys [tokens, num_kv_heads, head_dim] averaged with the
    attention they receive from the queries [tokens, num_heads, head_dim] of its query heads (causal
    softmax of the scaled scores, averaged over those heads and every position)."""
    tokens, kv_heads, head_dim = key.shape
    k = key.float()
    scores = torch.einsum("tkgd,skd->kgts", query.float().view(tokens, kv_heads, -1, head_dim), k) * scale
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=key.device).triu(1)
    received = scores.masked_fill(future, float("-inf")).softmax(dim=-1).mean(dim=(1, 2))  # [kv_heads, tokens]
    return torch.einsum("ks,skd->kd", received, k)


def _rounding_cost(rotations: torch.Tensor, query_cov: torch.Tensor, key_cov: torch.Tensor) -> torch.Tensor:
    """sum_i (R^T Sq R)_ii (R^T Sk R)_ii over every matrix: the variance that relative rounding errors of
    the rotated keys' dims add to q . k, up to e4m3's constant."""
    query_var = ((query_cov @ rotations) * rotations).sum(-2)
    key_var = ((key_cov @ rotations) * rotations).sum(-2)
    return (query_var * key_var).sum()


def key_rotations(queries: list[torch.Tensor], keys: list[torch.Tensor], k_offsets: torch.Tensor,
                  steps: int = ROTATION_STEPS) -> torch.Tensor:
    """[num_layers, num_kv_heads, head_dim, head_dim]: for each KV head an orthonormal R that keys (rows, less
    their offset) and the queries of its heads are multiplied by before the cache, chosen so that e4m3's
    rounding errors disturb q . k least.

    e4m3 rounds each stored value with an error proportional to the value, so the score error's
    variance is about sum_i E[q_i^2] E[k_i^2] over the rotated dims: it is small when the dims where
    queries are large hold little of the keys' spread. R minimizes that sum over the calibration
    tokens (`_rounding_cost`, the covariances normalized by their traces) by Adam on a skew-symmetric
    S, R = exp(S), from near R = I (seeded). Per KV head; the grouped query heads count together."""
    query_cov, key_cov = [], []
    for q, k, offset in zip(queries, keys, k_offsets):
        tokens, kv_heads, head_dim = k.shape
        grouped = q.float().view(tokens, kv_heads, -1, head_dim)
        centered = k.float() - offset
        query_cov.append(torch.einsum("tkgd,tkge->kde", grouped, grouped))
        key_cov.append(torch.einsum("tkd,tke->kde", centered, centered))
    with torch.inference_mode(False), torch.enable_grad():  # the runner calibrates in inference mode
        covs = [torch.stack(c).clone() for c in (query_cov, key_cov)]
        query_cov, key_cov = (c / c.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)[..., None, None] for c in covs)
        start = torch.randn(query_cov.shape, generator=torch.Generator().manual_seed(0)) * 1e-3  # off saddles such
        skew = start.to(query_cov.device).requires_grad_()  # as R = I where queries and keys share one dim
        optimizer = torch.optim.Adam([skew], lr=ROTATION_LR)
        for _ in range(steps):
            optimizer.zero_grad()
            _rounding_cost(torch.linalg.matrix_exp(skew - skew.mT), query_cov, key_cov).backward()
            optimizer.step()
        with torch.no_grad():
            return torch.linalg.matrix_exp(skew - skew.mT)


def calibrate(queries: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
              scale: float) -> FP8Calibration:
    """From each layer's calibration queries [tokens, num_heads, head_dim], keys and values [tokens,
    num_kv_heads, head_dim] (after RoPE), and the softmax scale."""
    k_offsets = torch.stack([attended_key_mean(q, k, scale) for q, k in zip(queries, keys)])
    rotations = key_rotations(queries, keys, k_offsets)
    rotated = [torch.einsum("tkd,kde->tke", k.float(), r) for k, r in zip(keys, rotations)]
    k_offsets = torch.einsum("lkd,lkde->lke", k_offsets, rotations)
    k_amax = torch.stack([(k - offset).abs().amax(dim=(0, 2)) for k, offset in zip(rotated, k_offsets)])
    v_amax = torch.stack([v.float().abs().amax(dim=(0, 2)) for v in values])
    return FP8Calibration(scales_from_amax(k_amax), scales_from_amax(v_amax), k_offsets.contiguous(),
                          rotations.contiguous())
