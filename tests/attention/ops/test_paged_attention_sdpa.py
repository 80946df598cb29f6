"""The CPU decode path (gather + SDPA) against the torch reference, paged_attention_v1.

Unused cache slots hold NaN and block-table entries past a sequence's blocks point at other
sequences' blocks (PagedKV), so reading past a length shows up in the result.
"""
from __future__ import annotations

import pytest
import torch
from paged_kv_case import PagedKV

from nanovllm.attention.ops.paged_attention_ref import paged_attention_v1, paged_prefill_attention
from nanovllm.attention.ops.paged_attention_sdpa import decode_gather, paged_attention_sdpa

SHAPES = [(9, 3, 64, 16), (8, 2, 64, 16), (4, 4, 128, 32), (16, 2, 64, 64), (8, 1, 32, 1)]  # heads, kv heads, dim, block
LENS = [1, 16, 37, 0, 77, 5]


def decode(case: PagedKV, query: torch.Tensor, max_context_len: int) -> torch.Tensor:
    gather = decode_gather(case.block_tables, case.lens, case.block_size, max_context_len)
    return paged_attention_sdpa(query, case.key_cache, case.value_cache, gather, query.shape[-1] ** -0.5,
                                case.k_scale, case.v_scale)


def reference(case: PagedKV, query: torch.Tensor, max_context_len: int) -> torch.Tensor:
    return paged_attention_v1(query, case.key_cache, case.value_cache, case.block_tables, case.lens, case.block_size,
                              max_context_len, k_scale=case.k_scale, v_scale=case.v_scale)


@pytest.mark.parametrize("fp8", [False, True], ids=["float32", "fp8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_reference(shape: tuple[int, int, int, int], fp8: bool) -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block = shape
    case = PagedKV(LENS, kv_heads, head_dim, block, torch.float32, "cpu", fp8=fp8)
    query = torch.randn(len(LENS), heads, head_dim)
    for max_context_len in (max(LENS), case.block_tables.shape[1] * block):  # exact, and the table's capacity
        out = decode(case, query, max_context_len)
        assert out.shape == query.shape and out.dtype == query.dtype
        assert torch.equal(out[3], torch.zeros_like(out[3]))  # empty context (a padding row) -> zeros
        torch.testing.assert_close(out, reference(case, query, max_context_len), rtol=1e-5, atol=1e-5)


def test_half_query_keeps_its_dtype() -> None:
    torch.manual_seed(0)
    case = PagedKV(LENS, 2, 64, 16, torch.bfloat16, "cpu")
    query = torch.randn(len(LENS), 8, 64).to(torch.bfloat16)
    out = decode(case, query, max(LENS))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference(case, query, max(LENS)), rtol=1e-2, atol=1e-2)


def test_fp8_decode_reads_each_querys_own_kv_from_the_step() -> None:
    """new_key/new_value replace each sequence's last position (the query's own), the key less k_offset:
    against the reference prefill of one query token per sequence, which does the same."""
    torch.manual_seed(1)
    case = PagedKV(LENS, 2, 64, 16, torch.float32, "cpu", fp8=True)
    query = torch.randn(len(LENS), 8, 64)
    own = dict(new_key=torch.randn(len(LENS), 2, 64), new_value=torch.randn(len(LENS), 2, 64),
               k_offset=torch.randn(2, 64))
    gather = decode_gather(case.block_tables, case.lens, case.block_size, max(LENS))
    out = paged_attention_sdpa(query, case.key_cache, case.value_cache, gather, 0.125, case.k_scale, case.v_scale,
                               **own)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # empty context (a padding row) -> zeros
    key_cache, value_cache = case.float_caches()
    for s, n in enumerate(LENS):
        if n:
            bounds = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
            want = paged_prefill_attention(query[s : s + 1], key_cache, value_cache, *bounds,
                                           case.block_tables[s : s + 1], 0.125, new_key=own["new_key"][s : s + 1],
                                           new_value=own["new_value"][s : s + 1], k_offset=own["k_offset"])
            torch.testing.assert_close(out[s : s + 1], want, rtol=1e-5, atol=1e-5)
