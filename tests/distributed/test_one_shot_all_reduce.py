"""The one-shot all-reduce kernel.

CPU (Triton's interpreter): rank 0 of two, with rank 1 played by the test, which writes its share
into its staging half and raises its flags before each call, as its kernel would.
GPU (2 CUDA GPUs): against NCCL's all-reduce on fresh random inputs, eagerly and replayed in a CUDA
graph with new inputs each time.
"""
from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import triton_cpu  # noqa: F401  (before the kernels: interpreter on CPU)

from nanovllm.distributed.one_shot_all_reduce import _one_shot_add_rms_norm_kernel, _one_shot_all_reduce_kernel
from nanovllm.distributed.parallel_state import init_tensor_parallel, leave_tensor_parallel
from nanovllm.layers.layernorm import add_rms_norm

PROGRAMS, BLOCK = 4, 64
TIMEOUT_NS = 60 * 10**9


def exchange_buffers(world: int, programs: int, half_bytes: int, device: str = "cpu"):
    """Every rank's staging buffer (two halves) and flags, and the pointer tables the kernels take."""
    staging = [torch.zeros(2 * half_bytes, dtype=torch.uint8, device=device) for _ in range(world)]
    flags = [torch.zeros(programs * world, dtype=torch.int64, device=device) for _ in range(world)]
    pointers = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device) for ts in (staging, flags)]
    return staging, flags, pointers


SM90_ACCESSES = """
import collections, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanovllm.distributed import one_shot_all_reduce as m

def accesses(fn, signature, constexprs):
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
               if kind.startswith("*") or name in ("n", "half_elems")}  # as Triton specializes them
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return sorted(set(re.findall(r"\\b(?:ld|st)\\.global[.\\w]*", kernel.asm["ptx"])))

common = {"buffers_ptr": "*i64", "flags_ptr": "*i64", "epochs_ptr": "*i64", "timeout_ns": "i64"}
print(accesses(m._one_shot_all_reduce_kernel,
               {"x_ptr": "*bf16", "out_ptr": "*bf16", **common, "n": "i32", "half_elems": "i32"},
               {"RANK": 0, "WORLD": 2, "PROGRAMS": m.PROGRAMS, "BLOCK": m.BLOCK}))
print(accesses(m._one_shot_add_rms_norm_kernel,
               {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
                **common, "num_rows": "i32", "half_elems": "i32", "eps": "fp32"},
               {"D": 4096, "BLOCK_D": 4096, "ROWS": 1, "RANK": 0, "WORLD": 2, "PROGRAMS": m.PROGRAMS}))
"""


def test_sm90_build_moves_16_bytes_per_access():
    """Compiled for sm90 (no GPU needed), every access to the bf16 data, the staging buffers that
    peers read over NVLink included, moves 16 bytes: addresses loaded from the pointer table carry
    no alignment, and without the kernels' hint each went 2 bytes at a time (2 MB all-reduced in
    56.8 us on two H200s instead of 12.2). The 8-byte accesses are the pointer table and epochs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SM90_ACCESSES], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for kernel in run.stdout.split("\n")[:2]:
        found = set(ast.literal_eval(kernel))
        assert found <= {"ld.global.b64", "st.global.b64", "ld.global.v4.b32", "st.global.v4.b32",
                         "ld.global.cg.v4.b32"}, found
        assert "ld.global.cg.v4.b32" in found  # the peers' staged data


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_stages_signals_and_sums_in_alternating_halves(dtype):
    world, half_bytes = 2, 4096
    half = half_bytes // dtype.itemsize
    staging, flags, pointers = exchange_buffers(world, PROGRAMS, half_bytes)
    epochs = torch.zeros(PROGRAMS, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    for call, n in enumerate([300, 7, 1000, PROGRAMS * BLOCK + 1], start=1):
        x, peer = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
        used = slice((call % 2) * half, (call % 2) * half + n)
        staging[1].view(dtype)[used] = peer  # rank 1's share, then its signal to every program of ours
        flags[0].view(PROGRAMS, world)[:, 1] = call
        out = torch.empty_like(x)
        _one_shot_all_reduce_kernel[(PROGRAMS,)](x, out, *pointers, epochs, TIMEOUT_NS, n, half, RANK=0, WORLD=world,
                                                 PROGRAMS=PROGRAMS, BLOCK=BLOCK)
        assert torch.equal(staging[0].view(dtype)[used], x)  # our share, staged in this call's half
        assert flags[1].view(PROGRAMS, world)[:, 0].tolist() == [call] * PROGRAMS  # signalled rank 1
        assert epochs.tolist() == [call] * PROGRAMS
        torch.testing.assert_close(out, (x.float() + peer.float()).to(dtype), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel_sums_adds_and_normalises_whole_rows(dtype):
    world, half_bytes, d, eps = 2, 8192, 48, 1e-6
    half = half_bytes // dtype.itemsize
    staging, flags, pointers = exchange_buffers(world, PROGRAMS, half_bytes)
    epochs = torch.zeros(PROGRAMS, dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    weight = (1 + torch.randn(d, generator=gen) / 4).to(dtype)
    for call, rows in enumerate([13, 1, 9], start=1):
        x, peer, residual = (torch.randn(rows, d, generator=gen).to(dtype) for _ in range(3))
        used = slice((call % 2) * half, (call % 2) * half + rows * d)
        staging[1].view(dtype)[used] = peer.flatten()
        flags[0].view(PROGRAMS, world)[:, 1] = call
        out, new_residual = torch.empty_like(x), torch.empty_like(x)
        _one_shot_add_rms_norm_kernel[(PROGRAMS,)](x, residual, weight, out, new_residual, *pointers, epochs,
                                                   TIMEOUT_NS, rows, half, eps, D=d, BLOCK_D=64, ROWS=2, RANK=0,
                                                   WORLD=world, PROGRAMS=PROGRAMS)
        assert torch.equal(staging[0].view(dtype)[used], x.flatten())
        assert flags[1].view(PROGRAMS, world)[:, 0].tolist() == [call] * PROGRAMS
        total = (x.float() + peer.float()).to(dtype)  # the all-reduce's output, in the model dtype
        want, want_residual = add_rms_norm.__wrapped__(total, residual, weight, eps)
        torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
        torch.testing.assert_close(out, want)  # (the mean of squares summed in another order)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_ranks_on_one_gpu_over_many_calls():
    """Both ranks' kernels on one GPU, on two streams at once: the flags, the epochs and the
    alternating halves on real hardware, call after call, the two kernels interleaved (they share
    the epochs), with sizes that change between calls."""
    world, programs, half_bytes, d, eps = 2, 8, 1 << 17, 1024, 1e-6
    staging, flags, pointers = exchange_buffers(world, programs, half_bytes, "cuda")
    epochs = [torch.zeros(programs, dtype=torch.int64, device="cuda") for _ in range(world)]
    streams = [torch.cuda.Stream() for _ in range(world)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = 1 + torch.randn(d, device="cuda", generator=gen).to(torch.bfloat16) / 4
    # rows of one Triton specialization (> 1, not multiples of 16): one kernel each per rank to load
    rows = [[5, 3, 7, 13, 9][call % 5] for call in range(200)]
    xs = [[torch.randn(r, d, dtype=torch.bfloat16, device="cuda", generator=gen) for r in rows] for _ in range(world)]
    residuals = [torch.randn(r, d, dtype=torch.bfloat16, device="cuda", generator=gen) for r in rows]
    outs = [[None] * len(rows) for _ in range(world)]

    def launch(rank: int, call: int) -> None:
        x = xs[rank][call]
        if call % 2:
            out, new_residual = torch.empty_like(x), torch.empty_like(x)
            _one_shot_add_rms_norm_kernel[(programs,)](x, residuals[call], weight, out, new_residual, *pointers,
                                                       epochs[rank], TIMEOUT_NS, x.shape[0], half_bytes // 2, eps,
                                                       D=d, BLOCK_D=d, ROWS=2, RANK=rank, WORLD=world,
                                                       PROGRAMS=programs, num_warps=8)
            outs[rank][call] = (out, new_residual)
        else:
            out = torch.empty_like(x)
            _one_shot_all_reduce_kernel[(programs,)](x, out, *pointers, epochs[rank], TIMEOUT_NS, x.numel(),
                                                     half_bytes // 2, RANK=rank, WORLD=world, PROGRAMS=programs,
                                                     BLOCK=2048, num_warps=8)
            outs[rank][call] = out

    # Each rank's kernels run once alone first, the peer's signal faked: loading a kernel waits for
    # the device to be idle, which it is not while the other rank's kernel spins, and here one host
    # thread launches both ranks (in a real group every rank has a GPU and a process of its own).
    for rank in range(world):
        for call in (0, 1):
            flags[rank].fill_(call + 1)
            launch(rank, call)
    torch.cuda.synchronize()
    for t in (*flags, *epochs):
        t.zero_()
    torch.cuda.synchronize()
    for rank in range(world):  # each rank's calls queued back to back: a rank runs ahead until a flag stops it
        with torch.cuda.stream(streams[rank]):
            for call in range(len(rows)):
                launch(rank, call)
    torch.cuda.synchronize()
    for call in range(len(rows)):
        total = (xs[0][call].float() + xs[1][call].float()).to(torch.bfloat16)
        if call % 2:
            want, want_residual = add_rms_norm.__wrapped__(total, residuals[call], weight, eps)
            for out, new_residual in (outs[0][call], outs[1][call]):
                torch.testing.assert_close(new_residual, want_residual, rtol=0, atol=0)
                torch.testing.assert_close(out, want)
            assert torch.equal(outs[0][call][0], outs[1][call][0])  # every rank gets the same bits
        else:
            for rank in range(world):
                torch.testing.assert_close(outs[rank][call], total, rtol=0, atol=0)
    assert all(e.tolist() == [len(rows)] * programs for e in epochs)


def _check_rank(rank: int, port: int) -> None:
    tp = init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "cuda")
    try:
        one_shot = tp.one_shot
        assert one_shot is not None
        gen = torch.Generator(device="cuda").manual_seed(rank)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shape in [(1, 4096), (7, 1000), (256, 4096), (3, 5), (1000, 4099)]:
                x = torch.randn(shape, dtype=dtype, device="cuda", generator=gen)
                want = x.clone()
                dist.all_reduce(want)
                before = x.clone()
                got = tp.all_reduce(x)  # one-shot where the message fits, else NCCL's in place
                if one_shot.fits(x):
                    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is left as it was
                torch.testing.assert_close(got, want, rtol=0, atol=0)  # two addends: one rounding
        weight = torch.randn(4096, dtype=torch.bfloat16, device="cuda", generator=gen)
        for tokens in (1, 7, 256):
            x, residual = (torch.randn(tokens, 4096, dtype=torch.bfloat16, device="cuda", generator=gen)
                           for _ in range(2))
            got, got_residual = one_shot.add_rms_norm(x, residual, weight, 1e-6)
            total = x.clone()
            dist.all_reduce(total)
            want, want_residual = add_rms_norm.__wrapped__(total, residual, weight, 1e-6)
            torch.testing.assert_close(got_residual, want_residual, rtol=0, atol=0)
            torch.testing.assert_close(got, want)
        too_big = torch.empty(one_shot.max_bytes // 2 + 1, dtype=torch.bfloat16, device="cuda")
        assert not one_shot.fits(too_big) and one_shot.fits(too_big[:-1])

        static = torch.empty(64, 4096, dtype=torch.bfloat16, device="cuda")
        tp.all_reduce(static)  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tp.all_reduce(tp.all_reduce(static) * 0.5)  # two in a row: both halves of the staging
        for _ in range(5):
            static.copy_(torch.randn(static.shape, dtype=static.dtype, device="cuda", generator=gen))
            graph.replay()
            want = static.clone()
            dist.all_reduce(want)
            want = want * 0.5
            dist.all_reduce(want)
            torch.testing.assert_close(out, want, rtol=0, atol=0)
        del graph
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        leave_tensor_parallel(clean=True)


DEAD_PEER = """
import time, torch
from nanovllm.distributed.one_shot_all_reduce import _one_shot_all_reduce_kernel
programs, world, half = 4, 2, 1 << 12
staging = [torch.zeros(4 * half, dtype=torch.uint8, device="cuda") for _ in range(world)]
flags = [torch.zeros(programs * world, dtype=torch.int64, device="cuda") for _ in range(world)]
pointers = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device="cuda") for ts in (staging, flags)]
x = torch.randn(1000, device="cuda")
start = time.perf_counter()
try:  # rank 1 never signals: rank 0 must give up after its 0.5 s
    _one_shot_all_reduce_kernel[(programs,)](x, torch.empty_like(x), *pointers, torch.zeros(programs, dtype=torch.int64,
        device="cuda"), 500_000_000, x.numel(), half, RANK=0, WORLD=world, PROGRAMS=programs, BLOCK=256)
    torch.cuda.synchronize()
except RuntimeError as e:
    print(f"trapped after {time.perf_counter() - start:.1f} s: {e}")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_peer_that_never_signals_fails_the_kernel_instead_of_hanging():
    """A worker that died mid-step leaves its peers' kernels waiting for its signal: they trap after
    their timeout, a CUDA error on the host (in a process of its own: the error ends its CUDA context)."""
    run = subprocess.run([sys.executable, "-c", DEAD_PEER], capture_output=True, text=True, timeout=120)
    assert "trapped after" in run.stdout, run.stdout + run.stderr[-2000:]
    assert float(run.stdout.split("trapped after ")[1].split(" s")[0]) < 30


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_equals_nccl_eager_and_in_graphs():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_check_rank, args=(port,), nprocs=2)
