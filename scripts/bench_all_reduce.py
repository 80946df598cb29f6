"""All-reduce time per call between the GPUs of one machine: NCCL against the one-shot kernel
(`nanovllm/distributed/one_shot_all_reduce.py`) at several grid shapes and torch's own
`symm_mem.one_shot_all_reduce_copy_out`, inside CUDA graphs as a decode step runs them.

    python scripts/bench_all_reduce.py [--world-size 2] [--hidden 4096] [--configs 64x8192,64x2048]

Messages are tokens x hidden in bfloat16 (a row-parallel layer's output); each row of the table
also checks that both give the same sum.
"""
from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
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


def run(rank: int, world: int, port: int, hidden: int, configs: list[tuple[int, int]]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    max_bytes = max(TOKENS) * hidden * 2
    one_shots = [OneShotAllReduce.create(dist.group.WORLD, device, max_bytes=max_bytes, programs=p, block=b)
                 for p, b in configs]
    if any(o is None for o in one_shots):
        raise SystemExit("one-shot all-reduce is unavailable here")
    group = dist.group.WORLD.group_name
    torch_staging = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
    symm_mem.rendezvous(torch_staging, group)

    def torch_one_shot(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        staged = torch_staging.view(x.dtype)[: x.numel()]
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x.view(-1), "sum", group, out.view(-1))
        return out

    names = [f"{p}x{b}" for p, b in configs] + ["torch"]
    if rank == 0:
        print(f"{world} ranks, hidden {hidden}, bf16, {CALLS} calls per graph; us per call; one-shot as "
              f"programs x elements per iteration; diff: largest |one-shot - NCCL|")
        print(f"{'tokens':>7} {'MB':>7} {'NCCL':>8}" + "".join(f" {n:>9}" for n in names) + "  diff")
    for tokens in TOKENS:
        gen = torch.Generator(device=device).manual_seed(1000 * tokens + rank)
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        want = nccl_sum(x.clone())
        fns = [*one_shots, torch_one_shot]
        diff = max((fn(x).float() - want.float()).abs().max().item() for fn in fns)
        t_nccl = time_us(graphed(nccl_sum, x.clone()))
        times = [time_us(graphed(fn, x)) for fn in fns]
        if rank == 0:
            mb = tokens * hidden * 2 / 2**20
            print(f"{tokens:>7} {mb:>7.2f} {t_nccl:>8.1f}" + "".join(f" {t:>9.1f}" for t in times) + f"  {diff:.3g}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--configs", default="64x8192,64x2048,128x4096,32x8192",
                   help="one-shot shapes to compare: PROGRAMSxBLOCK, comma-separated")
    args = p.parse_args()
    if torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"needs {args.world_size} CUDA GPUs, {torch.cuda.device_count()} visible")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    mp.spawn(run, args=(args.world_size, port, args.hidden, configs), nprocs=args.world_size)


if __name__ == "__main__":
    main()
