"""Decode-attention microbenchmark over the paged KV cache (Qwen3-0.6B shapes: 16 q heads, 8 KV heads,
head dim 128), one layer, every backend that loads: Triton bf16 and FP8 (block 16) and flash-attn's
``flash_attn_with_kvcache`` (block 256). Each call is timed inside a CUDA graph
(``triton.testing.do_bench_cudagraph``), so host overhead is excluded; small caches stay in L2.

    python scripts/bench_attention.py            # batch x context table, plus the bench-like mixed batch
    python scripts/bench_attention.py --sweep    # v1 vs v2 partition sizes: the data behind the heuristic
    python scripts/bench_attention.py --sweep --fp8   # the same over the FP8 cache
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import numpy as np
import torch
import triton
from triton.testing import do_bench_cudagraph

from nanovllm.attention.kv_cache import dim_major
from nanovllm.attention.metadata import longest_first
from nanovllm.attention.ops import triton_decode
from nanovllm.attention.ops.triton_decode import BLOCK_N, choose_num_partitions, longest_first_pays, paged_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
BATCHES = (1, 16, 64, 256, 512)
CONTEXTS = (512, 2048, 8192)
MAX_TOKENS = max(BATCHES) * max(CONTEXTS)


@dataclass
class Caches:
    """One bf16 and one fp8 cache big enough for the largest case; flash-attn views the bf16 one as 256-token blocks.
    The fp8 values are dim-major in each block, as the engine stores them (see `KVCache`)."""

    key: torch.Tensor
    value: torch.Tensor
    key_fp8: torch.Tensor
    value_fp8: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def allocate(cls) -> "Caches":
        shape = (MAX_TOKENS // 16, 16, NUM_KV_HEADS, HEAD_DIM)
        key = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        value = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        return cls(key, value, key.to(torch.float8_e4m3fn), dim_major(value.to(torch.float8_e4m3fn)),
                   torch.ones(NUM_KV_HEADS, device="cuda"))


def block_table(num_seqs: int, max_len: int, block_size: int) -> torch.Tensor:
    """Random distinct physical blocks, ``max_len`` tokens' worth per sequence."""
    per_seq = -(-max_len // block_size)
    physical = torch.randperm(MAX_TOKENS // block_size, device="cuda")[: num_seqs * per_seq]
    return physical.view(num_seqs, per_seq).int()


def engine_order(lens: list[int]) -> torch.Tensor | None:
    """The order the engine's decode grid takes sequences in (`AttentionMetadata.seq_order`), where it has one."""
    if not longest_first_pays(len(lens), NUM_KV_HEADS, torch.device("cuda")):
        return None
    return torch.from_numpy(longest_first(np.asarray(lens))).int().cuda()


def timed(fn) -> float:
    """Milliseconds per call."""
    return do_bench_cudagraph(fn, rep=20)


def kv_bytes(lens: list[int], elem_size: int) -> int:
    return sum(lens) * NUM_KV_HEADS * HEAD_DIM * 2 * elem_size


def own_kv(num_seqs: int) -> dict:
    """The step's own K/V, which the engine's FP8 decode reads for each query's own position."""
    shape = (num_seqs, NUM_KV_HEADS, HEAD_DIM)
    return dict(new_key=torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
                new_value=torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
                k_offset=torch.zeros(NUM_KV_HEADS, HEAD_DIM, device="cuda"))


def with_fp8_tile(block_n: int, fn):
    """``fn`` run with another K/V tile for FP8 caches (the default is ``FP8_BLOCK_N``)."""
    def run():
        saved, triton_decode.FP8_BLOCK_N = triton_decode.FP8_BLOCK_N, block_n
        try:
            return fn()
        finally:
            triton_decode.FP8_BLOCK_N = saved
    return run


def backends(caches: Caches, lens: list[int], query: torch.Tensor, max_len: int) -> dict:
    """name -> (callable, bytes per KV element)."""
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    order = engine_order(lens)
    table16 = block_table(len(lens), max_len, 16)
    scale = HEAD_DIM**-0.5
    own = own_kv(len(lens))
    out = {
        "triton-bf16": (lambda: paged_attention(query, caches.key, caches.value, table16, ctx, 16, max_len, scale,
                                                seq_order=order), 2),
        "triton-fp8": (lambda: paged_attention(query, caches.key_fp8, caches.value_fp8, table16, ctx, 16, max_len,
                                               scale, caches.scale, caches.scale, seq_order=order, **own), 1),
    }
    out["triton-fp8 tile64"] = (with_fp8_tile(64, out["triton-fp8"][0]), 1)
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return out
    table256 = block_table(len(lens), max_len, 256)
    key256 = caches.key.view(-1, 256, NUM_KV_HEADS, HEAD_DIM)
    value256 = caches.value.view(-1, 256, NUM_KV_HEADS, HEAD_DIM)
    out["flash-attn-bf16"] = (lambda: flash_attn_with_kvcache(
        query[:, None], key256, value256, cache_seqlens=ctx, block_table=table256, softmax_scale=scale,
        causal=True), 2)
    return out


def report(name: str, lens: list[int], query, caches: Caches, max_len: int) -> None:
    row = []
    for backend, (fn, elem_size) in backends(caches, lens, query, max_len).items():
        try:
            ms = timed(fn)
        except Exception as exc:  # a backend that cannot run this shape is reported, not fatal
            row.append(f"{backend} failed ({type(exc).__name__}: {str(exc)[:60]})")
            continue
        row.append(f"{backend} {ms * 1e3:8.1f} us {kv_bytes(lens, elem_size) / ms / 1e9:5.2f} TB/s")
    print(f"{name:<28} " + " | ".join(row), flush=True)


def main_table(caches: Caches, batches: list[int], contexts: list[int]) -> None:
    print(f"decode, {NUM_HEADS} q heads / {NUM_KV_HEADS} kv heads / head dim {HEAD_DIM}; time per call and KV read "
          "bandwidth; triton picks v1/v2 by choose_num_partitions", flush=True)
    for batch in batches:
        for context in contexts:
            query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            parts = choose_num_partitions(batch, NUM_KV_HEADS, context, query.device)
            report(f"batch {batch:3d} ctx {context:4d} (P={parts})", [context] * batch, query, caches, context)
    lens = bench_mix()
    query = torch.randn(256, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    report("bench mix: 256 x 200-2048", lens, query, caches, max(lens))
    report("  same, graph max_len 8192", lens, query, caches, 8192)


def bench_mix() -> list[int]:
    """The bench's contexts at its busiest: 256 sequences of 100-1,024 prompt + 100-1,024 output tokens."""
    rng = random.Random(0)
    return [rng.randint(100, 1024) + rng.randint(100, 1024) for _ in range(256)]


def sweep(caches: Caches, batches: list[int], fp8: bool) -> None:
    """us per call of v1 (P=1) and v2 at several partition sizes, per batch and context, then the
    bench's mix; ``maxlen`` rows pass a CUDA graph's max_context_len (8192) over shorter real contexts."""
    sizes = (64, 128, 256, 512, 1024, 2048)
    print(f"sweep ({'FP8' if fp8 else 'bf16'} cache, us): batch ctx maxlen | v1 | "
          + " | ".join(f"v2 ps={s}" for s in sizes) + " | the pick (P)", flush=True)
    scale = HEAD_DIM**-0.5
    key, value = (caches.key_fp8, caches.value_fp8) if fp8 else (caches.key, caches.value)
    scales = (caches.scale, caches.scale) if fp8 else (None, None)
    cases = [([context] * batch, max_len) for batch in batches
             for context, max_len in ((512, 512), (2048, 2048), (8192, 8192), (2048, 8192))
             if batch * max_len <= MAX_TOKENS]
    cases += [(bench_mix(), 2048), (bench_mix(), 8192)]
    for lens, max_len in cases:
        ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
        order = engine_order(lens)
        table = block_table(len(lens), max_len, 16)
        query = torch.randn(len(lens), NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        own = own_kv(len(lens)) if fp8 else {}

        def run(parts):
            return lambda: paged_attention(query, key, value, table, ctx, 16, max_len, scale, *scales,
                                           num_partitions=parts, seq_order=order, **own)

        cells = [timed(run(1))]
        cells += [timed(run(triton.cdiv(max_len, s))) if s < max_len else float("nan") for s in sizes]
        cells.append(timed(run(None)))  # one wave or less: partitions cut from each sequence's own length
        context = "mix" if len(set(lens)) > 1 else f"{lens[0]:4d}"
        print(f"sweep {len(lens):3d} {context:>4} {max_len:4d} | " + " | ".join(f"{c * 1e3:7.1f}" for c in cells)
              + f" (P={choose_num_partitions(len(lens), NUM_KV_HEADS, max_len, query.device, fp8)})", flush=True)
    print(f"(tile BLOCK_N={triton_decode.FP8_BLOCK_N if fp8 else BLOCK_N})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="v1/v2 partition sweep instead of the table")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: each mode's own)")
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS, help="context lengths of the table")
    parser.add_argument("--fp8", action="store_true", help="sweep the FP8 cache instead of bf16")
    args = parser.parse_args()
    torch.manual_seed(0)
    caches = Caches.allocate()
    if args.sweep:
        sweep(caches, args.batches or [1, 4, 16, 32, 64, 128, 256], args.fp8)
    else:
        main_table(caches, args.batches or BATCHES, args.contexts)


if __name__ == "__main__":
    main()
