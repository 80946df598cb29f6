"""All-reduce time per call between the GPUs of one machine: NCCL against the one-shot kernel
(`nanovllm/distributed/one_shot_all_reduce.py`), inside CUDA graphs as a decode step runs them.

    python scripts/bench_all_reduce.py [--world-size 2] [--hidden 4096] [--programs 32,64,128]

Messages are tokens x hidden in bfloat16 (a row-parallel layer's output); each row of the table
also checks that both give the same sum.
"""
from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanovllm.distributed.one_shot_all_reduce import OneShotAllReduce

TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)
CALLS = 20  # per graph replay


def graphed(fn, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)  # warm-up outside the graph (NCCL and the kernel set themselves up)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)
    return graph


def time_us(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * CALLS)


def nccl_sum(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def run(rank: int, world: int, port: int, hidden: int, programs: list[int]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    one_shots = [OneShotAllReduce.create(dist.group.WORLD, device, max_bytes=max(TOKENS) * hidden * 2, programs=p)
                 for p in programs]
    if any(o is None for o in one_shots):
        raise SystemExit("one-shot all-reduce is unavailable here")
    if rank == 0:
        print(f"{world} ranks, hidden {hidden}, bf16, {CALLS} calls per graph; us per call; one-shot with "
              f"P programs; diff: largest |one-shot - NCCL|")
        print(f"{'tokens':>7} {'MB':>7} {'NCCL':>8}" + "".join(f" {'P=' + str(p):>7}" for p in programs) + "  diff")
    for tokens in TOKENS:
        gen = torch.Generator(device=device).manual_seed(1000 * tokens + rank)
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        want = nccl_sum(x.clone())
        diff = max((o(x).float() - want.float()).abs().max().item() for o in one_shots)
        t_nccl = time_us(graphed(nccl_sum, x.clone()))
        times = [time_us(graphed(o, x)) for o in one_shots]
        if rank == 0:
            mb = tokens * hidden * 2 / 2**20
            print(f"{tokens:>7} {mb:>7.2f} {t_nccl:>8.1f}" + "".join(f" {t:>7.1f}" for t in times) + f"  {diff:.3g}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--programs", default="32,64,128", help="one-shot grid sizes to compare")
    args = p.parse_args()
    if torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"needs {args.world_size} CUDA GPUs, {torch.cuda.device_count()} visible")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    programs = [int(p) for p in args.programs.split(",")]
    mp.spawn(run, args=(args.world_size, port, args.hidden, programs), nprocs=args.world_size)


if __name__ == "__main__":
    main()
