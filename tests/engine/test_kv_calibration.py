"""FP8 KV calibration: the key offset is the keys' mean weighted by the attention they receive; the key
rotation spreads what queries and keys both load onto over the dims."""
from __future__ import annotations

import torch

from nanovllm.attention.kv_cache import FP8_MAX
from nanovllm.engine.kv_calibration import HEADROOM, _rounding_cost, attended_key_mean, calibrate, key_rotations


def loop_reference(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Query head h reads KV head h // group; each query position t attends causally to keys 0..t."""
    tokens, kv_heads, head_dim = key.shape
    group = query.shape[1] // kv_heads
    received = torch.zeros(kv_heads, tokens, dtype=torch.float64)
    for h in range(query.shape[1]):
        for t in range(tokens):
            scores = key[: t + 1, h // group].double() @ query[t, h].double() * scale
            received[h // group, : t + 1] += scores.softmax(0)
    received /= group * tokens
    return torch.einsum("ks,skd->kd", received, key.double()).float()


def test_attended_mean_weights_keys_by_the_attention_they_receive():
    torch.manual_seed(0)
    query, key = torch.randn(7, 6, 8), torch.randn(7, 2, 8)  # GQA: three query heads per KV head
    torch.testing.assert_close(attended_key_mean(query, key, 0.4), loop_reference(query, key, 0.4))


def test_attended_mean_is_the_sink_when_every_query_looks_at_it():
    torch.manual_seed(1)
    key = torch.randn(9, 1, 16)
    query = 50 * key[0, 0].expand(9, 2, 16)  # every query's score on key 0 dwarfs the others
    torch.testing.assert_close(attended_key_mean(query, key, 1.0), key[0], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(key.mean(0), key[0], atol=0.1)  # where the plain mean would be elsewhere


def test_uniform_attention_weights_early_keys_more():
    """With zero queries position t spreads 1 / (t + 1) over keys 0..t: key s receives the mean of
    those shares over t >= s."""
    key = torch.randn(5, 1, 4)
    shares = torch.tensor([sum(1 / (t + 1) for t in range(s, 5)) / 5 for s in range(5)])
    want = (shares[:, None] * key[:, 0]).sum(0, keepdim=True)
    torch.testing.assert_close(attended_key_mean(torch.zeros(5, 1, 4), key, 1.0), want)


def test_calibrate_scales_the_rotated_offset_keys_and_the_values():
    torch.manual_seed(2)
    queries = [torch.randn(6, 4, 8) for _ in range(2)]
    keys = [torch.randn(6, 2, 8) + 3 for _ in range(2)]
    values = [torch.randn(6, 2, 8) for _ in range(2)]
    fp8 = calibrate(queries, keys, values, 0.35)
    for layer in range(2):
        rotation = fp8.k_rotations[layer]  # [kv_heads, 8, 8]
        torch.testing.assert_close(rotation @ rotation.mT, torch.eye(8).expand(2, 8, 8), rtol=0, atol=1e-5)
        offset = torch.einsum("kd,kde->ke", attended_key_mean(queries[layer], keys[layer], 0.35), rotation)
        torch.testing.assert_close(fp8.k_offsets[layer], offset)
        rotated = torch.einsum("tkd,kde->tke", keys[layer], rotation)
        k_amax = (rotated - offset).abs().amax(dim=(0, 2))
        torch.testing.assert_close(fp8.k_scales[layer], k_amax * HEADROOM / FP8_MAX)
        torch.testing.assert_close(fp8.v_scales[layer], values[layer].abs().amax(dim=(0, 2)) * HEADROOM / FP8_MAX)


def test_rotation_spreads_a_direction_that_queries_and_keys_share():
    """Queries and keys all along dim 0: unrotated, every rounding error of dim 0 reaches q . k (cost 1);
    the best rotation spreads that direction evenly over the 16 dims (cost 1 / 16, as a Hadamard matrix)."""
    torch.manual_seed(3)
    direction = torch.zeros(16)
    direction[0] = 1.0
    queries = [torch.randn(40, 2, 1) * direction]  # two query heads over one KV head
    keys = [torch.randn(40, 1, 1) * direction]
    rotation = key_rotations(queries, keys, torch.zeros(1, 1, 16))
    torch.testing.assert_close(rotation[0, 0] @ rotation[0, 0].T, torch.eye(16), rtol=0, atol=1e-5)
    cov = (direction[:, None] * direction[None, :]).expand(1, 1, 16, 16)
    assert _rounding_cost(torch.eye(16).expand(1, 1, 16, 16), cov, cov) == 1.0
    assert _rounding_cost(rotation, cov, cov) < 1.1 / 16
    assert (rotation[0, 0, 0].abs() - 0.25).abs().max() < 0.05  # dim 0 spread evenly: 1 / sqrt(16) each


def test_rotation_lowers_the_rounding_cost_of_correlated_heads():
    """Random queries and keys with a few large shared directions per head: the optimized rotation costs
    less than the identity, where it starts from, in every layer and head."""
    torch.manual_seed(4)
    mixing = torch.randn(2, 16, 16) * torch.tensor([8.0, 4.0, 2.0] + [0.3] * 13)[:, None]
    queries = [torch.randn(64, 4, 16) @ mixing[0] for _ in range(2)]
    keys = [torch.randn(64, 2, 16) @ mixing[1] for _ in range(2)]
    offsets = torch.stack([k.mean(0) for k in keys])
    rotations = key_rotations(queries, keys, offsets)
    for layer in range(2):
        for head in range(2):
            q = queries[layer].view(64, 2, 2, 16)[:, head].reshape(-1, 16)
            k = keys[layer][:, head] - offsets[layer, head]
            sq, sk = (q.T @ q)[None, None], (k.T @ k)[None, None]
            before = _rounding_cost(torch.eye(16)[None, None], sq, sk)
            after = _rounding_cost(rotations[layer, head][None, None], sq, sk)
            assert after < 0.8 * before
