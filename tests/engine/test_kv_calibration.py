"""FP8 KV calibration: the key offset is the keys' mean weighted by the attention they receive."""
from __future__ import annotations

import torch

from nanovllm.attention.kv_cache import FP8_MAX
from nanovllm.engine.kv_calibration import HEADROOM, attended_key_mean, calibrate


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


def test_calibrate_scales_the_offset_keys_and_the_values():
    torch.manual_seed(2)
    queries = [torch.randn(6, 4, 8) for _ in range(2)]
    keys = [torch.randn(6, 2, 8) + 3 for _ in range(2)]
    values = [torch.randn(6, 2, 8) for _ in range(2)]
    fp8 = calibrate(queries, keys, values, 0.35)
    for layer in range(2):
        offset = attended_key_mean(queries[layer], keys[layer], 0.35)
        torch.testing.assert_close(fp8.k_offsets[layer], offset)
        k_amax = (keys[layer] - offset).abs().amax(dim=(0, 2))
        torch.testing.assert_close(fp8.k_scales[layer], k_amax * HEADROOM / FP8_MAX)
        torch.testing.assert_close(fp8.v_scales[layer], values[layer].abs().amax(dim=(0, 2)) * HEADROOM / FP8_MAX)
