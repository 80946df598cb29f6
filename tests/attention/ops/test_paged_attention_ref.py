"""Paged attention reference kernels against plain per-sequence softmax attention."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nanovllm.attention.ops.paged_attention_ref import (
    paged_attention,
    paged_attention_v1,
    paged_attention_v2,
    paged_prefill_attention,
)

DECODE_KERNELS = [paged_attention_v1, paged_attention_v2]
SHAPES = [  # (num_heads, num_kv_heads, head_dim, block_size)
    (8, 2, 64, 16),
    (4, 4, 128, 16),
    (8, 2, 128, 256),
    (4, 4, 64, 256),
]


@dataclass
class PagedCache:
    keys: list[torch.Tensor]  # contiguous per-sequence [len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32, padded with 0
    used: list[int]  # number of blocks each sequence owns


def make_cache(lens, num_kv_heads, head_dim, block_size, dtype=torch.float32, extra_blocks=3, extra_cols=2):
    """Random contiguous K/V scattered into randomly permuted physical blocks of a random cache."""
    used = [-(-n // block_size) for n in lens]
    num_blocks = sum(used) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    physical = torch.randperm(num_blocks)
    block_tables = torch.zeros(len(lens), max(used) + extra_cols, dtype=torch.int32)
    keys, values, start = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, used)):
        blocks = physical[start : start + nb]
        start += nb
        block_tables[i, :nb] = blocks
        keys.append(torch.randn(n, num_kv_heads, head_dim, dtype=dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, dtype=dtype))
        for t in range(n):
            key_cache[blocks[t // block_size], t % block_size] = keys[i][t]
            value_cache[blocks[t // block_size], t % block_size] = values[i][t]
    return PagedCache(keys, values, key_cache, value_cache, block_tables, used)


def reference_attention(q, k, v, scale, q_offset=None):
    """Float64 softmax attention of q [q_len, H, D] over k/v [k_len, KVH, D], causal if q_offset is set."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if q_offset is not None:
        allowed = torch.arange(k.shape[0])[None, :] <= (q_offset + torch.arange(q.shape[0]))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def decode_lens(block_size):
    return [1, block_size, 2 * block_size, block_size + 5, 3 * block_size - 7, 2, block_size - 1]


def decode_case(num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32):
    lens = decode_lens(block_size)
    cache = make_cache(lens, num_kv_heads, head_dim, block_size, dtype)
    query = torch.randn(len(lens), num_heads, head_dim, dtype=dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return cache, query, context_lens


def run_decode(kernel, cache, query, context_lens, max_context_len=None, **kwargs):
    block_size = cache.key_cache.shape[1]
    max_context_len = int(context_lens.max()) if max_context_len is None else max_context_len
    return kernel(
        query, cache.key_cache, cache.value_cache, cache.block_tables, context_lens, block_size, max_context_len,
        **kwargs,
    )


def decode_reference(cache, query, scale):
    return torch.cat(
        [reference_attention(query[i : i + 1], k, v, scale) for i, (k, v) in enumerate(zip(cache.keys, cache.values))]
    )


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_reference(kernel, shape):
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = shape
    cache, query, context_lens = decode_case(*shape)
    out = run_decode(kernel, cache, query, context_lens)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert rel_err(out, decode_reference(cache, query, head_dim**-0.5)) < 1e-5


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_custom_scale_and_larger_max_context_len(kernel):
    torch.manual_seed(1)
    cache, query, context_lens = decode_case(8, 2, 64, 16)
    capacity = cache.block_tables.shape[1] * 16
    out = run_decode(kernel, cache, query, context_lens, max_context_len=capacity, scale=0.3)
    assert rel_err(out, decode_reference(cache, query, 0.3)) < 1e-5


@pytest.mark.parametrize("version", [1, 2])
def test_dispatch_and_versions_agree(version):
    torch.manual_seed(2)
    cache, query, context_lens = decode_case(8, 2, 64, 16)
    out = run_decode(paged_attention, cache, query, context_lens, version=version)
    expected = run_decode(DECODE_KERNELS[version - 1], cache, query, context_lens)
    assert torch.equal(out, expected)
    other = run_decode(DECODE_KERNELS[2 - version], cache, query, context_lens)
    assert rel_err(out, other) < 1e-5
    with pytest.raises(ValueError, match="version"):
        run_decode(paged_attention, cache, query, context_lens, version=3)


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_bfloat16(kernel):
    torch.manual_seed(3)
    cache, query, context_lens = decode_case(8, 2, 128, 16, dtype=torch.bfloat16)
    out = run_decode(kernel, cache, query, context_lens)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, decode_reference(cache, query, 128**-0.5)) < 2e-2


def poison_unused(cache, lens):
    """Copy of the cache whose padding table entries point elsewhere and whose unused slots hold NaN."""
    key_cache, value_cache = cache.key_cache.clone(), cache.value_cache.clone()
    block_size = key_cache.shape[1]
    live = torch.zeros(key_cache.shape[:2], dtype=torch.bool)
    block_tables = cache.block_tables.clone()
    for i, (n, nb) in enumerate(zip(lens, cache.used)):
        for t in range(n):
            live[block_tables[i, t // block_size], t % block_size] = True
        block_tables[i, nb:] = key_cache.shape[0] - 1 - i % 2
    key_cache[~live] = float("nan")
    value_cache[~live] = float("nan")
    return PagedCache(cache.keys, cache.values, key_cache, value_cache, block_tables, cache.used)


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_ignores_padding_and_unused_slots(kernel):
    torch.manual_seed(4)
    cache, query, context_lens = decode_case(8, 2, 64, 16)
    poisoned = poison_unused(cache, context_lens.tolist())
    assert not torch.equal(poisoned.block_tables, cache.block_tables)
    capacity = cache.block_tables.shape[1] * 16
    out = run_decode(kernel, cache, query, context_lens, max_context_len=capacity)
    assert torch.equal(run_decode(kernel, poisoned, query, context_lens, max_context_len=capacity), out)


def test_decode_empty_context_gives_zeros():
    torch.manual_seed(5)
    cache, query, context_lens = decode_case(4, 4, 64, 16)
    context_lens[0] = 0
    for kernel in DECODE_KERNELS:
        out = run_decode(kernel, cache, query, context_lens)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert rel_err(out[1:], decode_reference(cache, query, 64**-0.5)[1:]) < 1e-5


PREFILL_LENS = [(5, 5), (16, 16), (1, 1), (7, 40), (1, 33), (16, 48), (20, 37)]  # (q_len, k_len)


def prefill_case(num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32):
    q_lens, k_lens = zip(*PREFILL_LENS)
    cache = make_cache(k_lens, num_kv_heads, head_dim, block_size, dtype)
    query = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (q_lens, k_lens))
    return cache, query, cu_q, cu_k


def prefill_reference(cache, query, cu_q, scale):
    outs = []
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        q = query[cu_q[i] : cu_q[i + 1]]
        outs.append(reference_attention(q, k, v, scale, q_offset=k.shape[0] - q.shape[0]))
    return torch.cat(outs)


def run_prefill(cache, query, cu_q, cu_k, **kwargs):
    return paged_prefill_attention(query, cache.key_cache, cache.value_cache, cu_q, cu_k, cache.block_tables, **kwargs)


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_matches_reference(shape):
    torch.manual_seed(6)
    cache, query, cu_q, cu_k = prefill_case(*shape)
    out = run_prefill(cache, query, cu_q, cu_k)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert rel_err(out, prefill_reference(cache, query, cu_q, shape[2] ** -0.5)) < 1e-5


def test_prefill_bfloat16_custom_scale_and_padding():
    torch.manual_seed(7)
    cache, query, cu_q, cu_k = prefill_case(8, 2, 64, 16, dtype=torch.bfloat16)
    out = run_prefill(cache, query, cu_q, cu_k, scale=0.2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, prefill_reference(cache, query, cu_q, 0.2)) < 2e-2
    poisoned = poison_unused(cache, [k for _, k in PREFILL_LENS])
    assert torch.equal(run_prefill(poisoned, query, cu_q, cu_k, scale=0.2), out)


def test_prefill_reads_each_querys_own_kv_from_the_step():
    """With new_key/new_value, query i of a sequence attends to its cached context except at its own
    position, k_len - q_len + i, whose K/V are the step's (the key less k_offset): row by row against
    the float64 reference over that sequence's K/V with this one position replaced."""
    torch.manual_seed(10)
    cache, query, cu_q, cu_k = prefill_case(8, 2, 64, 16)
    new_key, new_value = torch.randn(query.shape[0], 2, 64), torch.randn(query.shape[0], 2, 64)
    offset = torch.randn(2, 64)
    out = run_prefill(cache, query, cu_q, cu_k, new_key=new_key, new_value=new_value, k_offset=offset)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        q_start, q_end = int(cu_q[i]), int(cu_q[i + 1])
        for row in range(q_start, q_end):
            pos = k.shape[0] - q_end + row
            own_k, own_v = k[: pos + 1].clone(), v[: pos + 1].clone()
            own_k[pos], own_v[pos] = new_key[row] - offset, new_value[row]
            assert rel_err(out[row : row + 1], reference_attention(query[row : row + 1], own_k, own_v, 64**-0.5)) < 1e-5


def test_decode_bad_arguments_raise():
    torch.manual_seed(8)
    cache, query, context_lens = decode_case(8, 2, 64, 16)
    kc, vc, bt = cache.key_cache, cache.value_cache, cache.block_tables
    max_len = int(context_lens.max())
    bad_calls = [
        (query[0], kc, vc, bt, context_lens, 16, max_len),  # query rank
        (query[:, :3], kc, vc, bt, context_lens, 16, max_len),  # 3 heads, 2 kv heads
        (query[..., :32], kc, vc, bt, context_lens, 16, max_len),  # head_dim mismatch
        (query, kc[0], vc[0], bt, context_lens, 16, max_len),  # cache rank
        (query, kc, vc[..., :32], bt, context_lens, 16, max_len),  # k/v mismatch
        (query, kc, vc, bt[0], context_lens, 16, max_len),  # block table rank
        (query, kc, vc, bt.float(), context_lens, 16, max_len),  # block table dtype
        (query, kc, vc, bt[:-1], context_lens, 16, max_len),  # row count
        (query, kc, vc, bt, context_lens, 8, max_len),  # block size
        (query, kc, vc, bt, context_lens, 16, max_len - 1),  # context longer than max
        (query, kc, vc, bt, context_lens, 16, bt.shape[1] * 16 + 1),  # beyond the table
    ]
    for kernel in DECODE_KERNELS:
        for args in bad_calls:
            with pytest.raises(ValueError):
                kernel(*args)


def test_prefill_bad_arguments_raise():
    torch.manual_seed(9)
    cache, query, cu_q, cu_k = prefill_case(8, 2, 64, 16)
    kc, vc, bt = cache.key_cache, cache.value_cache, cache.block_tables
    swapped = cu_k.clone()
    swapped[1] = 1  # first sequence: k_len 1 < q_len 5
    too_long = cu_k.clone()
    too_long[-1] += bt.shape[1] * 16
    bad_calls = [
        (query[:, :3], kc, vc, cu_q, cu_k, bt),
        (query, kc, vc, cu_q[:-1], cu_k, bt),
        (query[:-1], kc, vc, cu_q, cu_k, bt),
        (query, kc, vc, cu_q, swapped, bt),
        (query, kc, vc, cu_q, too_long, bt),
        (query, kc, vc, cu_q, cu_k, bt[:-1]),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            paged_prefill_attention(*args)
