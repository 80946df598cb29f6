"""Compile the Triton decode kernel for sm90 without a GPU, over the shapes the engine and the tests
launch: a compiler failure of the device's Triton then shows on CPU, before a device call.

    python -m pip install --target /tmp/t36 triton==3.6.0       # the device image's Triton
    PYTHONPATH=/tmp/t36:$PWD python scripts/compile_sm90.py      # the grid below
    python scripts/compile_sm90.py --shape 2 1 128 16 --ptx      # one shape's PTX

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

UNALIGNED = {"scale_log2", "num_partitions", "stride_bt"}  # a float, and integers seldom a multiple of 16


def build(group: int, query_len: int, head_dim: int, block: int, fp8: bool) -> object:
    """The split-KV decode kernel (v2) for a GQA group, query tokens per sequence, head dim, cache block
    and cache dtype (an FP8 cache has dim-major values and scales), compiled for sm90 with 4 warps."""
    kernel = triton_decode._decode_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    cache = "*fp8e4nv" if fp8 else "*bf16"
    pointers = dict(out_ptr="*bf16", q_ptr="*bf16", k_cache_ptr=cache, v_cache_ptr=cache, counters_ptr="*i32",
                    block_tables_ptr="*i32", context_lens_ptr="*i32", query_start_loc_ptr="*i32")
    consts = dict(GROUP=group, ROWS=max(16, triton.next_power_of_2(group * query_len)), HEAD_DIM=head_dim,
                  BLOCK_SIZE=block, BLOCK_N=triton_decode.FP8_BLOCK_N if fp8 else triton_decode.BLOCK_N, FP8=fp8,
                  SINK=False, V_DIM_MAJOR=fp8, SINGLE=False, MULTI=query_len > 1, PRECISION="tf32",
                  SPLIT_P=not fp8, PDL=True, k_sink_ptr=None, v_sink_ptr=None,
                  **triton_decode._merge_constexprs(group, query_len, head_dim))
    if not fp8:
        consts.update(k_scale_ptr=None, v_scale_ptr=None, stride_vd=1)
    signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32") if n.endswith("_ptr")
                 else "fp32" if n == "scale_log2" else "i32" for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts and n not in UNALIGNED}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})


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
    args = p.parse_args()
    shapes = [(*args.shape, args.fp8)] if args.shape else grid()
    failures = 0
    for shape in shapes:
        try:
            kernel = build(*shape)
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
