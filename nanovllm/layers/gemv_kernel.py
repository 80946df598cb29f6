"""A Triton GEMV for one-row linear layers (decode at batch 1), where cuBLAS reads weights slowly.

Measured on the H200 in a CUDA graph, bf16, one row (`x @ W.T`, W [N, K]), us per call:

==============  ========  ==========
W (N x K)       F.linear  this GEMV
==============  ========  ==========
4096 x 1024     3.8       2.9
1024 x 2048     12.8      3.2
6144 x 1024     4.9       3.6
1024 x 3072     6.4       4.2
==============  ========  ==========

Qwen3-0.6B's four projections per layer go from 28 to 14 us. Up to `MAX_ROWS` rows (decode at batch 2, an eager
step of 3) a program reads its W tile once and reduces each row from it in turn: compiled for sm90 each row adds
~200 instructions per thread (no spills; 96 registers at 5-8 rows, when it took that many), against cuBLAS's
5-12 us per projection at 4 rows, which read the weights at a fraction of the bandwidth. `bench.py --num-seqs n`
(128-token prompts, 1,024 tokens out) on the H200, ms per decode step, cuBLAS against this GEMV (`MAX_ROWS` 8)
in one call (S): batch 4 1.58 -> 1.42 and 1.58 -> 1.46, batch 1 0.92 -> 0.91 (the LM head's GEMV too), but batch
8 1.62 -> 2.04, so `MAX_ROWS` is 4. With 4, in call U: batch 2 1.61 -> 1.30, batch 4 1.58 -> 1.44, batch 8
1.63 -> 1.62 (cuBLAS). Batch decode pads 5-8 sequences to 8 rows (`cuda_graph.graph_batch_sizes`), so a layer
sees 5 rows in a verify step (k = 4 at batch 1): with the GEMV at 5 rows everywhere (the LM head too) such a
step went 1.64 -> 1.45 ms (call AI), while batch-5 decode, whose 5 rows reach only the LM head (eager, after the
graph), went 1.57 -> 1.71 ms (call AH), so the LM head kept cuBLAS at 5 rows. Since the graphs run the LM head
too (`cuda_graph`), on a graph's padded rows, decode at batch 5 gives it 8 rows, and only a verify step at batch
1 (or an eager step's 5 sampled rows) gives it 5: the GEMV took them (call AZ: a verify step unchanged within
its noise, 1.48-1.65 ms per step either way) until call BF timed cuBLAS ahead at 4-5 rows (SmolLM2's LM head 16
against 39-45 us, Qwen3's 77-80 against 118-141) and within 5 us either way at 2 (16.0 against 20.5; 75.9
against 71.6): `embed_head.float32_logits` takes the GEMV at one row only. The RMSNorm before a projection done
in its GEMV (every program normalising the rows itself, one kernel fewer) left batch 1 at 0.86 ms per step and
made batch 4 slower, 1.34 -> 1.43 ms (call AZ): not kept.

With PDL (`nanovllm/utils/pdl.py`, sm90+) a program reads its whole W tile before it waits for x,
while the kernel before it still runs. Tiles of 8,192 weights (a row of up to 4,096, so 2-8 output
features) with 4 warps gave the fastest batch-1 decode step of the shapes tried on the H200
(`bench.py --num-seqs 1`, 128-token prompt, 1,024 tokens out): 0.93 ms, against 1.06-1.21 ms with
16,384 and 8 warps, 1.08 ms with 32,768 and 8 warps, 1.08 ms with the loop tiles below.

From 4 rows on `linear` takes `split_k_gemm` instead. Before it (call BF) 4-5 rows of a layer with more
outputs than inputs (qkv, gate_up) took a tensor-core kernel here, rows padded to 16 and one `tl.dot` per W tile
(µs per call at 5 rows, cuBLAS / row by row / that kernel: SmolLM2 qkv 3.2 / 3.8 / 2.4, gate_up 3.0 / 4.5 / 2.7;
Qwen3-0.6B qkv 3.6 / 4.9 / 4.1, gate_up 4.3 / 6.9 / 4.7), while o and down, whose 32-feature programs were too
few, stayed row by row; the split-K GEMM is that kernel with K cut into parts, which fills the GPU for every layer.
Call CQ (H200, `bench.py --num-seqs 4`, alternating twice): 1.33 / 1.11 -> 1.00 / 0.99 ms per step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.utils.pdl import pdl_launch_dependents, pdl_wait, use_pdl

TILE = 8192  # weight elements a program reads per iteration with PDL (16 KB of bf16)
MAX_ROWS = 3  # rows the GEMV takes; more: `split_k_gemm`


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, stride_wn, stride_xm, stride_om, K: tl.constexpr,
                 ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, ROWS_PAD)
    pdl_launch_dependents(PDL)
    # the first tile of W (all of it when K <= BLOCK_K) is read before x exists: with PDL while the
    # kernel that writes x still runs
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
    pdl_wait(PDL)
    acc = tl.zeros([ROWS_PAD, BLOCK_N], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        if k0 > 0:
            w = tl.load(w_ptr + n[:, None] * stride_wn + (k0 + k)[None, :],
                        mask=(n[:, None] < N) & ((k0 + k)[None, :] < K), other=0.0)
        w32 = w.to(tl.float32)
        # every row of x in one load: a load per row inside the loop waited on each reduction before it
        xs = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + k)[None, :],
                     mask=(rows[:, None] < ROWS) & ((k0 + k)[None, :] < K), other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):  # each row reduced on its own, from the W tile read once
            x = tl.sum(tl.where(rows[:, None] == r, xs, 0.0), axis=0)
            row = tl.sum(w32 * x[None, :], axis=1)
            acc = tl.where(rows[:, None] == r, acc + row[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < ROWS) & (n[None, :] < N))


def _config(k: int, pdl: bool) -> tuple[int, int, int]:
    """(output features per program, K tile, warps). With PDL a program reads all of its W tile
    before waiting for x, so the tile spans the whole row (up to 4096) and the launch overlaps the
    previous kernel; without it, 16 features per program and a loop over K tiles."""
    if pdl:
        block_k = min(4096, triton.next_power_of_2(k))
        return max(1, TILE // block_k), block_k, 4
    block_k = min(1024 if k >= 2048 else 256, triton.next_power_of_2(k))
    return 16, block_k, 8 if block_k >= 1024 else 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K] (1 <= M <= MAX_ROWS, unit stride along K) and weight
    [N, K] with unit stride along K: each program reads its W tile once for all M rows. The float32
    sums are rounded to `out_dtype` (default x's: float32 for the LM head's logits).

    With PDL the kernel reads ``weight`` before it waits for the kernel launched just before it, so
    that kernel must not be the one that writes ``weight`` (a model's weights are written at load)."""
    assert x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    n, k = weight.shape
    out = torch.empty(x.shape[0], n, dtype=out_dtype or x.dtype, device=x.device)
    pdl = use_pdl(x.device)
    bias_arg = bias if bias is not None else weight
    block_n, block_k, num_warps = _config(k, pdl)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias_arg, out, n, weight.stride(0), x.stride(0), out.stride(0),
        K=k, ROWS=x.shape[0], ROWS_PAD=triton.next_power_of_2(x.shape[0]), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return out
