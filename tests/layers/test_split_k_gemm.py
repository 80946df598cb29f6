"""The split-K GEMM (4-16 rows) against a float64 matmul (Triton's interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton_cpu  # noqa: F401  (before the kernels: interpreter on CPU)

from nanovllm.layers import split_k_gemm as module
from nanovllm.layers.split_k_gemm import split_k_gemm
from nanovllm.utils.arrival import arrival_counters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# K in one part (short of a tile), in three with a partial last one; N in part of a tile, a tile and a bit, one tile
@pytest.mark.parametrize("n,k", [(40, 300), (module.BLOCK_N + 6, 2 * module.BLOCK_K + 76),
                                 (module.BLOCK_N, module.BLOCK_K)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [4, 11, module.MAX_ROWS])
def test_split_k_gemm_matches_matmul(n, k, with_bias, rows):
    torch.manual_seed(n + k + rows)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    out = split_k_gemm(x, weight, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert not arrival_counters(x.device, 0).any()  # every last part reset its tile's counter
    assert torch.equal(out, split_k_gemm(x, weight, bias))  # the parts are added in a fixed order
