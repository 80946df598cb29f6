"""The tensor-parallel group a model is split over: its rank and size, and the collectives the layers use.

Layers take a `TensorParallel` when they are built and keep it, so a single-rank model
(the default, `SINGLE`) never touches torch.distributed: no process group, no collective.
Ranks 0..N-1 share torch.distributed's default process group (NCCL on CUDA, gloo on CPU),
one per process, so a process hosts at most one tensor-parallel engine at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.distributed.one_shot_all_reduce import OneShotAllReduce


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    # CUDA ranks on peer-linked GPUs: small all-reduces (decode steps) bypass NCCL
    one_shot: OneShotAllReduce | None = field(default=None, compare=False, repr=False)

    def split(self, n: int) -> int:
        """This rank's share of n (heads, rows, columns) split evenly across the ranks."""
        if n % self.size:
            raise ValueError(f"{n} does not split evenly across {self.size} tensor-parallel ranks")
        return n // self.size

    def device(self, device: str) -> torch.device:
        """Rank r of a CUDA group runs on cuda:r."""
        if self.size > 1 and device.startswith("cuda"):
            return torch.device("cuda", self.rank)
        return torch.device(device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x: x itself, summed in place, or a new tensor; x on a single rank."""
        if self.size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x)
        return x

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (KV-cache block counts must agree)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's x concatenated along the last dim, in rank order; other ranks: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked in rank order: [size, *x.shape], on every rank."""
        if self.size == 1:
            return x.unsqueeze(0)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (x is filled in place on the others)."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x


SINGLE = TensorParallel()


def dist_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_tensor_parallel(rank: int, size: int, init_method: str, device: str,
                         one_shot_all_reduce: bool = True) -> TensorParallel:
    """Join the group of `size` ranks as `rank` (rank r of a CUDA group on cuda:r). On CUDA, small
    all-reduces then take the one-shot path unless `one_shot_all_reduce` is False (every rank must
    pass the same)."""
    tp = TensorParallel(rank, size)
    if device.startswith("cuda"):
        torch.cuda.set_device(tp.device(device))
    dist.init_process_group(dist_backend(device), init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(minutes=10))
    if device.startswith("cuda") and one_shot_all_reduce:
        tp = TensorParallel(rank, size, OneShotAllReduce.create(dist.group.WORLD, tp.device(device)))
    return tp


def leave_tensor_parallel(clean: bool) -> None:
    """Leave the group. Clean: every rank leaves at once, as NCCL's teardown needs (it waits for all
    of them). Otherwise (a rank failed, or may wait in a collective) an NCCL group is aborted, which
    waits for no one; gloo's teardown never waits."""
    if not dist.is_initialized():
        return
    if clean or dist.get_backend() != "nccl":
        dist.destroy_process_group()
    else:
        dist.distributed_c10d._abort_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
