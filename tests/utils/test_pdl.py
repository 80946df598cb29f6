"""Programmatic dependent launch: the switch, and (GPU) long chains of dependent kernels in a CUDA graph
give the same bits with PDL as without, so no kernel reads its predecessor's output early."""
from __future__ import annotations

import pytest
import torch

from nanovllm.layers import gemv_kernel
from nanovllm.layers.fused_kernels import add_rms_norm, apply_rotary, silu_and_mul
from nanovllm.layers.linear import linear
from nanovllm.utils.pdl import use_pdl


def test_use_pdl_off_cuda_and_by_env(monkeypatch):
    assert not use_pdl(torch.device("cpu"))
    monkeypatch.setenv("NANOVLLM_DISABLE_PDL", "1")
    assert not use_pdl(torch.device("cuda", 0))  # decided before asking the device


def chain(x: torch.Tensor, weights: list[torch.Tensor], norm: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """A decoder layer's kernel sequence, repeated: each kernel reads the one before (`linear` takes the
    GEMV at one row, the split-K GEMM at 16)."""
    rows = x.shape[0]
    residual = x
    positions = torch.zeros(rows, dtype=torch.int64, device=x.device)
    for w_up, w_down in zip(weights[::2], weights[1::2]):
        h, residual = add_rms_norm(x, residual, norm, 1e-6)
        up = linear(h, w_up)  # [rows, 2 * 1024]
        q, k = apply_rotary(positions, up[:, :1024].view(rows, 8, 128), up[:, 1024:].view(rows, 8, 128), cos_sin)
        x = linear(silu_and_mul(torch.cat([q.view(rows, -1), k.view(rows, -1)], 1)), w_down)  # [rows, 1024]
    return x + residual


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90")
@pytest.mark.parametrize("rows", [1, 16])
def test_pdl_chain_in_cuda_graph_is_bitwise_equal(monkeypatch, rows):
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    weights = [(torch.randn(2048, 1024, device=device) / 32).to(dtype) if i % 2 == 0
               else (torch.randn(1024, 1024, device=device) / 32).to(dtype) for i in range(80)]
    norm = (1 + 0.1 * torch.randn(1024, device=device)).to(dtype)
    cos_sin = torch.randn(2, 4, 128, device=device)
    x = torch.randn(rows, 1024, device=device).to(dtype)
    # the GEMV's tiles as with PDL in both runs, so that only the launch differs (its tiles without PDL
    # sum in another order)
    monkeypatch.setattr(gemv_kernel, "_config", lambda k, pdl, config=gemv_kernel._config: config(k, True))
    results = {}
    for disabled in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_DISABLE_PDL", disabled)
        assert use_pdl(device) == (disabled == "0")
        chain(x, weights, norm, cos_sin)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x, weights, norm, cos_sin)
        runs = []
        for _ in range(20):
            graph.replay()
            runs.append(out.clone())
        torch.cuda.synchronize()
        results[disabled] = runs
    reference = results["1"][0]
    assert torch.isfinite(reference.float()).all()
    for run in results["1"] + results["0"]:
        torch.testing.assert_close(run, reference, rtol=0, atol=0)
