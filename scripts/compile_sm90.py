"""Compile the Triton decode kernel (or the sampler's kernels) for sm90 without a GPU, over the shapes
and variants the engine launches: a compiler failure of the device's Triton then shows on CPU, before
a device call.

    python -m pip install --target /tmp/t36 triton==3.6.0       # the device image's Triton
    PYTHONPATH=/tmp/t36:$PWD python scripts/compile_sm90.py      # the grid below
    python scripts/compile_sm90.py --shape 2 1 128 16 --ptx      # one shape's PTX
    python scripts/compile_sm90.py --sampler                     # the sampler's launch variants

Arguments are specialized as a launch on the device specializes them (pointers and most integers
divisible by 16, a unit stride as a constant, absent pointers as None), which decides which compiler
passes see what: call AD's H200 run of the several-query-token sweep aborted in Triton 3.6's
OptimizeThreadLocality pass on a merge shape that compiled without that specialization, and under
Triton 3.9 with it.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanovllm.attention.ops import triton_decode  # noqa: E402
from nanovllm.layers import sampling_kernels as sk  # noqa: E402

UNALIGNED = {"scale_log2", "num_partitions", "stride_bt"}  # a float, and integers seldom a multiple of 16


def build(group: int, query_len: int, head_dim: int, block: int, fp8: bool) -> object:
    """The split-KV decode kernel (v2) for a GQA group, query tokens per sequence, head dim, cache block
    and cache dtype (an FP8 cache has dim-major values, scales, key offsets and the step's own K/V),
    compiled for sm90 with 4 warps."""
    kernel = triton_decode._decode_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    cache = "*fp8e4nv" if fp8 else "*bf16"
    pointers = dict(out_ptr="*bf16", q_ptr="*bf16", k_cache_ptr=cache, v_cache_ptr=cache, counters_ptr="*i32",
                    block_tables_ptr="*i32", context_lens_ptr="*i32", query_start_loc_ptr="*i32",
                    seq_order_ptr="*i32", new_k_ptr="*bf16", new_v_ptr="*bf16")
    consts = dict(GROUP=group, ROWS=max(16, triton.next_power_of_2(group * query_len)), HEAD_DIM=head_dim,
                  BLOCK_SIZE=block, BLOCK_N=triton_decode.FP8_BLOCK_N if fp8 else triton_decode.BLOCK_N, FP8=fp8,
                  SINK=False, OWN=fp8, K_OFFSET=fp8, V_DIM_MAJOR=fp8, SINGLE=False, MULTI=query_len > 1,
                  PRECISION="tf32", SPLIT_P=not fp8, ORDERED=True, PDL=True, k_sink_ptr=None, v_sink_ptr=None,
                  **triton_decode._merge_constexprs(group, query_len, head_dim))
    if not fp8:
        consts.update(k_scale_ptr=None, v_scale_ptr=None, new_k_ptr=None, new_v_ptr=None, k_offset_ptr=None,
                      stride_vd=1)
    signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32") if n.endswith("_ptr")
                 else "fp32" if n == "scale_log2" else "i32" for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts and n not in UNALIGNED}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})


SAMPLER_POINTERS = dict(greedy_ptr="*i1", key_ptr="*i64", top_k_ptr="*i64", top_p_ptr="*fp64", token_ptr="*i64",
                        best_idx_ptr="*i32", ok_ptr="*i8", count_ptr="*i32", idx_ptr="*i32", top_id_ptr="*i64")


def build_sampler(name: str, consts: dict, num_warps: int, logits: str) -> object:
    """One of `sampling_kernels`' kernels with the given constexprs, for sm90; `logits` is the dtype of
    the logits (x and raw), every other float pointer float32."""
    kernel = getattr(sk, name)
    names = list(inspect.signature(kernel.fn).parameters)
    floats = {n: logits for n in ("x_ptr", "raw_ptr")}
    signature = {n: "constexpr" if n in consts else {**SAMPLER_POINTERS, **floats}.get(n, "*fp32")
                 if n.endswith("_ptr") else "i32" for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") and n not in consts}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sampler_grid() -> list[tuple[str, dict, int, str]]:
    """The variants `layers/sampler.py` launches: the chunk pass drawing every row (plain sampling,
    a vocabulary shard) or the unfiltered rows while it bounds the filters, with and without raw
    statistics, over float32 or bf16 logits; the merge, gather and select kernels behind it, and the
    kernel that finishes the rows whose candidates overflowed."""
    jobs = []
    chunk = [(sk.DRAW_ALL, False, False), (sk.DRAW_UNFILTERED, True, False), (sk.DRAW_UNFILTERED, True, True)]
    for (draw, filters, sums), raw_stats, raw_is_x, logits in itertools.product(
            chunk, (False, True), (False, True), ("*fp32", "*bf16")):
        jobs.append(("_chunk_kernel", dict(DRAW=draw, FILTER=filters, SUMS=sums,
                                           RAW_STATS=raw_stats, RAW_IS_X=raw_is_x, BLOCK=sk.BLOCK),
                     sk.CHUNK_WARPS, logits))
    for filters, raw_stats, top_k, top_p, min_p in itertools.product((False, True), repeat=5):
        if filters or not (top_k or top_p or min_p):
            for token_lp in (False, True) if raw_stats and not filters else (False,):
                consts = dict(CHUNKS=sk.CHUNKS, NUM_LANES=sk.LANES, SAMPLE=True, FILTER=filters, RAW_STATS=raw_stats,
                              TOKEN_LP=token_lp, DO_TOP_K=top_k, DO_TOP_P=top_p, DO_MIN_P=min_p,
                              PIVOT_ITERS=sk.PIVOT_ITERS)
                if not filters:
                    consts.update(pivot_ptr=None, ok_ptr=None)
                if not token_lp:
                    consts.update(token_lp_ptr=None)
                jobs.append(("_merge_kernel", consts, 8, "*fp32"))
    for logits in ("*fp32", "*bf16"):
        jobs.append(("_gather_kernel", dict(CAP=256, BLOCK=sk.GATHER_BLOCK), sk.GATHER_WARPS, logits))
    for top_k, top_p, min_p, (token_lp, top) in itertools.product(
            (False, True), (False, True), (False, True), ((False, False), (True, False), (True, True))):
        consts = dict(CAP=2048, CHUNKS=sk.CHUNKS, DO_TOP_K=top_k, DO_TOP_P=top_p, DO_MIN_P=min_p,
                      TOKEN_LP=token_lp, TOP=top)
        if not token_lp:
            consts.update(token_lp_ptr=None)
        if not top:
            consts.update(top_lp_ptr=None, top_id_ptr=None)
        jobs.append(("_select_kernel", consts, 8, "*fp32"))
        exact = {k: v for k, v in consts.items() if k not in ("CAP", "CHUNKS")}
        for logits in ("*fp32", "*bf16"):
            jobs.append(("_exact_kernel", {**exact, "BLOCK": sk.EXACT_BLOCK}, 8, logits))
    return jobs


def grid() -> list[tuple[int, int, int, int, bool]]:
    """GQA groups 1-8 with one, five and the most query tokens a program takes (64 rows), head dims 64
    and 128, blocks 16 and 256, bf16 and FP8."""
    shapes = []
    for fp8, group, tokens, head_dim, block in itertools.product((False, True), (1, 2, 4, 8), (1, 5, None),
                                                                 (64, 128), (16, 256)):
        shapes.append((group, tokens or 64 // group, head_dim, block, fp8))
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, metavar=("GROUP", "QUERY_LEN", "HEAD_DIM", "BLOCK"))
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--ptx", action="store_true", help="print the PTX of --shape")
    p.add_argument("--sampler", action="store_true", help="the sampler's kernels instead")
    args = p.parse_args()
    shapes = sampler_grid() if args.sampler else [(*args.shape, args.fp8)] if args.shape else grid()
    failures = 0
    for shape in shapes:
        try:
            kernel = build_sampler(*shape) if args.sampler else build(*shape)
        except Exception as e:  # noqa: BLE001 (a compiler failure of any kind is the report)
            failures += 1
            print(f"FAIL {shape}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        if args.ptx:
            print(kernel.asm["ptx"])
        else:
            print(f"ok {shape}: shared {kernel.metadata.shared} bytes", flush=True)
    print(f"triton {triton.__version__}: {len(shapes) - failures} of {len(shapes)} compiled", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
