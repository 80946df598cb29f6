"""Triton prefill (causal, several query tokens per sequence over a cached prefix) against the
float32 torch reference; interpreter on CPU, a full sweep on CUDA."""
from __future__ import annotations

import random

import pytest
import torch
import triton_cpu  # noqa: F401  (before the kernels: interpreter on CPU)
from paged_kv_case import PagedKV

from nanovllm.attention.ops.paged_attention_ref import paged_prefill_attention as reference_prefill
from nanovllm.attention.ops.triton_prefill import paged_prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-3}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def prefill_case(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block, dtype, fp8=False,
                 pad_rows=0, sinks=False):
    case = PagedKV(seq_lens, num_kv_heads, head_dim, block, dtype, DEVICE, fp8=fp8, sinks=sinks)
    query = torch.randn(sum(q_lens) + pad_rows, num_heads, head_dim, device=DEVICE).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return case, query, query_start_loc


def run(case, query, query_start_loc, q_lens, sinks=True, **own):
    return paged_prefill_attention(query, case.key_cache, case.value_cache, case.block_tables, query_start_loc,
                                   case.lens, max(q_lens), int(case.lens.max()), query.shape[-1] ** -0.5,
                                   case.k_scale, case.v_scale, case.k_sink if sinks else None,
                                   case.v_sink if sinks else None, **own)


def reference(case, query, query_start_loc, **own):
    """Float32 reference over the (dequantized) cache, returned in the query's dtype as the kernel is
    (each query's own K/V from ``own``'s new_key/new_value when given)."""
    key_cache, value_cache = case.float_caches()
    cu_k = torch.cat([case.lens.new_zeros(1), case.lens.cumsum(0)]).int()
    rows = int(query_start_loc[-1])
    out = reference_prefill(query[:rows].float(), key_cache, value_cache, query_start_loc, cu_k, case.block_tables,
                            query.shape[-1] ** -0.5, **own)
    return out.to(query.dtype)


# (q_lens, seq_lens): whole prompts, chunked prefill over a cached prefix, speculative verification
# (a few tokens over a long prefix), a single token, and an empty sequence in the batch
LENS = [([5, 16, 1], [5, 16, 1]), ([7, 1, 20, 0], [70, 33, 37, 9]), ([4, 3], [130, 4])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 2, 64, 16), (6, 2, 128, 32), (3, 3, 64, 16), (12, 4, 64, 64)], ids=str)
def test_prefill_matches_reference(shape, dtype):
    torch.manual_seed(0)
    for q_lens, seq_lens in LENS if dtype == torch.float32 else LENS[1:2]:
        case, query, qsl = prefill_case(q_lens, seq_lens, *shape, dtype, pad_rows=2)
        out = run(case, query, qsl, q_lens)
        assert out.shape == query.shape and out.dtype == dtype
        assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))  # padding rows
        assert rel_err(out[:-2], reference(case, query, qsl)) < TOL[dtype]


def test_prefill_fp8_cache_matches_dequantized_reference():
    torch.manual_seed(1)
    q_lens, seq_lens = LENS[1]
    case, query, qsl = prefill_case(q_lens, seq_lens, 8, 2, 64, 16, torch.float32, fp8=True)
    assert rel_err(run(case, query, qsl, q_lens), reference(case, query, qsl)) < 2e-3  # float16 dots


@pytest.mark.parametrize("block", [16, 64])  # 64: the first block spans four of the sink loop's 16-token tiles
def test_prefill_reads_first_blocks_from_float16_sinks(block):
    torch.manual_seed(2)
    q_lens, seq_lens = LENS[1]
    case, query, qsl = prefill_case(q_lens, seq_lens, 8, 2, 64, block, torch.float32, fp8=True, sinks=True)
    ref = reference(case, query, qsl)
    assert rel_err(run(case, query, qsl, q_lens), ref) < 2e-3
    assert rel_err(run(case, query, qsl, q_lens, sinks=False), ref) > 5e-3  # their FP8 copies differ


def test_prefill_rejects_bad_input():
    q_lens, seq_lens = LENS[0]
    case, query, qsl = prefill_case(q_lens, seq_lens, 4, 2, 64, 16, torch.float32)
    args = (query, case.key_cache, case.value_cache, case.block_tables)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(*args, qsl[:-1], case.lens, 16, 16, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_prefill_attention(*args, qsl, case.lens.long(), 16, 16, 0.1)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(*args, qsl, case.lens, 17, 16, 0.1)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        fp8 = case.key_cache.to(torch.float8_e4m3fn)
        paged_prefill_attention(query, fp8, fp8, case.block_tables, qsl, case.lens, 16, 16, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_prefill_sweep(fp8):
    """Blocks 16/32/64/256, head dims 64/128, GQA 1/2/4/8, contexts 1-4096, with and without a cached
    prefix (q_len < seq_len), and padding rows past the last sequence."""
    rng = random.Random(7)
    worst = 0.0
    for _ in range(24):
        kv_heads, group = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        seq_lens = [rng.choice([rng.randint(1, 64), rng.randint(1, 4096)]) for _ in range(rng.randint(1, 5))]
        q_lens = [rng.choice([n, rng.randint(1, n), min(n, rng.randint(1, 8))]) for n in seq_lens]
        case, query, qsl = prefill_case(q_lens, seq_lens, kv_heads * group, kv_heads,
                                        rng.choice([64, 128]), rng.choice([16, 32, 64, 256]), torch.bfloat16,
                                        fp8=fp8, pad_rows=3)
        out = run(case, query, qsl, q_lens)
        assert not out.isnan().any() and torch.equal(out[-3:], torch.zeros_like(out[-3:]))
        worst = max(worst, rel_err(out[:-3], reference(case, query, qsl)))
    print(f"prefill {'fp8' if fp8 else 'bf16'}: worst rel err {worst:.2e}")
    assert worst <= (4e-3 if fp8 else 2e-3)


@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("lens", LENS[:2], ids=["prompts", "over a prefix"])
def test_fp8_prefill_reads_each_querys_own_kv_from_the_step(lens, sinks):
    """Each query row reads its own position from new_key/new_value (the key less k_offset), the rest of
    its causal context from the cache: the diagonal of every query tile, in full and masked tiles."""
    torch.manual_seed(3)
    q_lens, seq_lens = lens
    case, query, qsl = prefill_case(q_lens, seq_lens, 8, 2, 64, 16, torch.float32, fp8=True, pad_rows=2, sinks=sinks)
    own = dict(new_key=torch.randn(query.shape[0], 2, 64, device=DEVICE),
               new_value=torch.randn(query.shape[0], 2, 64, device=DEVICE), k_offset=torch.randn(2, 64, device=DEVICE))
    ref = reference(case, query, qsl, **own)
    out = run(case, query, qsl, q_lens, **own)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))  # padding rows
    assert rel_err(out[:-2], ref) < 2e-3
    assert rel_err(run(case, query, qsl, q_lens)[:-2], ref) > 5e-2  # the cache's entries on the diagonal
