"""Linear layers of a small decode batch (1 to 16 rows) on CUDA: cuBLAS (`F.linear`) against the Triton kernels
`linear` takes there (the GEMV of `layers/gemv_kernel.py` up to its `MAX_ROWS`, then `layers/split_k_gemm.py`),
in CUDA graphs as decode runs them.

    python scripts/bench_small_gemm.py [--rows 1 2 4 8 16]

Shapes: Qwen3-0.6B's four projections (the bench model) and SmolLM2-135M's (the default model).
Prints us per call. Each call here follows the previous one directly, so PDL overlaps only a
kernel with its own predecessor; in a decode step the GEMM's weight read overlaps a norm or an
attention kernel instead (`bench.py --num-seqs N` measures that). Successive calls read different
copies of W, at least `L2_BYTES` in all, so that W comes from memory as in a decode step, not from L2.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from nanovllm.layers import split_k_gemm
from nanovllm.layers.gemv_kernel import MAX_ROWS, gemv
from nanovllm.layers.linear import linear

SHAPES = {  # name: (N, K) of W
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048),
    "qwen3-0.6b gate_up": (6144, 1024), "qwen3-0.6b down": (1024, 3072),
    "smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate_up": (3072, 576), "smollm2 down": (576, 1536),
    "qwen3-0.6b lm_head": (151936, 1024), "smollm2 lm_head": (49152, 576),  # float32 logits
}
CALLS = 50
L2_BYTES = 2 * 50 * 2**20  # twice the L2 of the GPUs we run on (H100 and H200: 50 MB)


def time_us(fn, weights: list[torch.Tensor]) -> float:
    """us per call of ``fn(weight)`` in a CUDA graph of CALLS calls, each on the next of ``weights``."""
    fn(weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    cycle = itertools.cycle(weights)
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(next(cycle))
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * CALLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   choices=range(1, split_k_gemm.MAX_ROWS + 1))
    args = p.parse_args()
    print(f"{'shape':<20} {'rows':>4} {'cuBLAS':>7} {'Triton':>7}")
    for name, (n, k) in SHAPES.items():
        copies = -(-L2_BYTES // (2 * n * k))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if name.endswith("lm_head"):  # as `embed_head.float32_logits` runs them
                if m > MAX_ROWS:
                    continue
                ours, theirs = (lambda w: gemv(x, w, out_dtype=torch.float32),
                                lambda w: torch.mm(x, w.t(), out_dtype=torch.float32))
            else:
                ours, theirs = lambda w: linear(x, w), lambda w: F.linear(x, w)
            torch.testing.assert_close(ours(weights[0]).float(), theirs(weights[0]).float(), rtol=2e-2, atol=2e-2)
            print(f"{name:<20} {m:>4} {time_us(theirs, weights):>7.1f} {time_us(ours, weights):>7.1f}", flush=True)


if __name__ == "__main__":
    main()
