"""The Triton GEMV (1 to MAX_ROWS rows) against a float64 matmul (Triton's interpreter on CPU), and `linear`'s
dispatch to it, the split-K GEMM and cuBLAS."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers import gemv_kernel, split_k_gemm
from nanovllm.layers.gemv_kernel import gemv
from nanovllm.layers.linear import linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


# partial blocks of N and K, K over two tiles, N > K
@pytest.mark.parametrize("n,k", [(40, 96), (16, 300), (33, 2048), (6, 5000), (300, 40), (700, 600)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("pdl_tiles", [False, True])  # the tiles PDL launches take (whole rows), without PDL
@pytest.mark.parametrize("rows", [1, 2, gemv_kernel.MAX_ROWS])  # one, two, the most (padded to 4)
def test_gemv_matches_matmul(n, k, with_bias, pdl_tiles, rows, monkeypatch):
    if pdl_tiles:
        monkeypatch.setattr(gemv_kernel, "_config", lambda k, pdl, config=gemv_kernel._config: config(k, True))
    torch.manual_seed(n + k)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    x = torch.randn(rows, k, device=DEVICE).to(dtype)  # last: with PDL the GEMV reads W before its wait
    out = gemv(x, weight, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    ref = reference(x, weight, bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_gemv_float32_out_from_half_inputs():
    """The LM head's use: half-precision operands, float32 sums kept as float32."""
    torch.manual_seed(0)
    weight, x = torch.randn(300, 96, device=DEVICE).half(), torch.randn(3, 96, device=DEVICE).half()
    out = gemv(x, weight, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, None), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])  # Qwen3-0.6B's layers
def test_linear_takes_gemv_then_split_k_up_to_16_rows(dtype, n, k):
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    for rows in (1, 2, gemv_kernel.MAX_ROWS, gemv_kernel.MAX_ROWS + 1, split_k_gemm.MAX_ROWS,
                 split_k_gemm.MAX_ROWS + 1):
        x = torch.randn(rows, k, device="cuda").to(dtype)
        if rows <= gemv_kernel.MAX_ROWS:
            torch.testing.assert_close(linear(x, weight), gemv(x, weight), rtol=0, atol=0)
        elif rows <= split_k_gemm.MAX_ROWS:
            torch.testing.assert_close(linear(x, weight), split_k_gemm.split_k_gemm(x, weight), rtol=0, atol=0)
        torch.testing.assert_close(linear(x, weight).double(), reference(x, weight, None), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lm_head_logits_take_gemv_at_one_row():
    from nanovllm.layers.embed_head import float32_logits

    torch.manual_seed(0)
    weight = (torch.randn(49152, 576, device="cuda") / 24).bfloat16()
    for rows in (1, 2, gemv_kernel.MAX_ROWS):
        hidden = torch.randn(rows, 576, device="cuda").bfloat16()
        logits = float32_logits(hidden, weight)
        assert logits.dtype == torch.float32
        if rows == 1:
            torch.testing.assert_close(logits, gemv(hidden, weight, out_dtype=torch.float32), rtol=0, atol=0)
        torch.testing.assert_close(logits.double(), reference(hidden, weight, None), rtol=1e-4, atol=1e-4)
