"""A Triton GEMM for decode batches of 4-16 rows (`linear`; the CUDA graphs pad batches of 3-4, 5-8 and 9-16
sequences to 4, 8 or 16 rows; a verify step at batch 1 has 5), where a step is a chain of short kernels and
cuBLAS's cannot start before the kernel ahead of them ends.

x's rows are padded to 16 (the smallest tensor-core tile) and W is cut into tiles of `BLOCK_N` output
features x `BLOCK_K` inputs, one program each: with PDL (`nanovllm.utils.pdl`) a program reads its whole W
tile before it waits for x, while the kernel before it still runs, then does one `tl.dot`. K is split
into ``cdiv(K, BLOCK_K)`` such parts, so even a layer with few outputs (o_proj, down_proj) fills the GPU;
each part writes its float32 partial sums and the last part of an output tile to arrive
(`nanovllm.utils.arrival`) adds them in a fixed order (the same bits whatever the arrival order), adds
the bias and writes the output. Qwen3-0.6B's layers at 16 rows: 128 / 64 / 192 / 96 programs for
qkv / o / gate_up / down (64-feature tiles: 190 registers for sm90, no spills).

On the H200 (call CN, µs per call in a CUDA graph, W rotated over 8 copies so that L2 cannot hold it,
16 rows, cuBLAS / this kernel with 32-feature tiles): qkv 4.85 / 4.69, o 5.13 / 3.40, gate_up 5.48 / 5.95,
down 6.87 / 4.25. In a decode step it gains more, since each GEMM now overlaps the kernel before it:
`bench.py --num-seqs 16` (128-token prompts, 1,024 tokens out) 1.63 / 1.64 -> 1.39 / 1.39 ms per step,
`--num-seqs 8` 1.44 -> 1.21 ms (call CN); main against this tree in call CO: 1.64 / 1.63 -> 1.39 / 1.39 and
1.46 -> 1.20 ms. Tiles (features x inputs) in call CP, µs for qkv / o / gate_up / down, then ms per step at
batch 16: 32 x 512 4.7 / 3.6 / 5.9 / 4.3, 1.39; **64 x 512** 4.2 / 3.4 / 5.6 / 3.9, 1.33; 32 x 256 5.1 /
4.2 / 6.0 / 5.0, 1.46; 64 x 256 4.7 / 4.1 / 5.8 / 5.3, 1.46 (cuBLAS 4.9 / 5.5 / 5.9 / 6.9). Tiles of 16
features took 1.52 ms (CN); 64 features with 8 warps 1.35, 128 with 8 warps 1.33 (CQ). Call CQ, 32 x 512
against 64 x 512 tiles alternating twice: batch 16 1.39 / 1.39 -> 1.33 / 1.33 ms, batch 8 1.19 -> 1.11 ms.
cuBLASLt instead of cuBLAS (`torch.backends.cuda.preferred_blas_library`) changed nothing (call CM: the same
nvjet kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.utils.arrival import arrival_counters, last_to_arrive
from nanovllm.utils.pdl import pdl_launch_dependents, pdl_wait, use_pdl

MAX_ROWS = 16  # rows padded to one tensor-core tile
BLOCK_N = 64  # output features per program
BLOCK_K = 512  # inputs per program: K is split into cdiv(K, BLOCK_K) parts


@triton.jit
def _store_out(acc, b_ptr, out_ptr, rows, n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (n[None, :] < N))


@triton.jit
def _split_k_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, counter_ptr, M, N, stride_wn, stride_xm, stride_om,
                    K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    tile = tl.program_id(0)
    part = tl.program_id(1)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k = part * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.arange(0, 16)
    pdl_launch_dependents(PDL)
    # all of this program's W, read before x exists: with PDL while the kernel that writes x still runs
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    pdl_wait(PDL)
    xs = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                 other=0.0)
    acc = tl.dot(xs, tl.trans(w))
    if SPLIT == 1:
        _store_out(acc, b_ptr, out_ptr, rows, n, M, N, stride_om, HAS_BIAS)
    else:
        parts = part_ptr + rows[:, None] * N + n[None, :]  # part j's sums at parts + j * 16 * N
        live = (rows[:, None] < M) & (n[None, :] < N)
        tl.store(parts + part * 16 * N, acc, mask=live)
        if last_to_arrive(counter_ptr + tile, SPLIT):
            total = tl.zeros([16, BLOCK_N], tl.float32)
            for j in tl.static_range(SPLIT):
                total += tl.load(parts + j * 16 * N, mask=live, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)
            _store_out(total, b_ptr, out_ptr, rows, n, M, N, stride_om, HAS_BIAS)


def split_k_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K] (1 <= M <= MAX_ROWS, unit stride along K) and weight [N, K]
    with unit stride along K, summed in float32 and rounded once to x's dtype.

    With PDL the kernel reads ``weight`` before it waits for the kernel launched just before it, so that
    kernel must not be the one that writes ``weight`` (a model's weights are written at load). A CUDA graph
    capture needs an eager call of at least as many output tiles first (`arrival_counters`)."""
    assert x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    m, k = x.shape
    n = weight.shape[0]
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(k)))
    tiles, split = triton.cdiv(n, BLOCK_N), triton.cdiv(k, block_k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = torch.empty(split, 16, n, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = arrival_counters(x.device, tiles) if split > 1 else out
    pdl = use_pdl(x.device)
    _split_k_kernel[(tiles, split)](
        x, weight, bias if bias is not None else weight, out, partials, counters, m, n, weight.stride(0),
        x.stride(0), out.stride(0), K=k, SPLIT=split, BLOCK_N=BLOCK_N, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        PDL=pdl, num_warps=4, num_stages=1, launch_pdl=pdl)
    return out
