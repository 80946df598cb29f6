"""Linear layers split across tensor-parallel ranks (on one rank: plain, fused linear layers).

- `MergedColumnParallelLinear`: several projections of one input stacked along the output dim
  (gate_up_proj); each rank holds its slice of every projection's output rows.
- `QKVParallelLinear`: q, k and v by heads; each rank holds its query heads and the KV heads
  they read (a KV head is replicated when there are more ranks than KV heads, as vLLM does).
- `RowParallelLinear`: the input dim split (o_proj, down_proj take a column-parallel output);
  each rank's partial product is summed by an all-reduce.

The checkpoint loader calls `param.weight_loader(param, loaded, shard_id)`; `loaded` may be a
safetensors slice, of which each rank reads only its own part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import SINGLE, TensorParallel
from nanovllm.layers.weight_slice import Loaded, copy_slice


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except up to 16 bf16/fp16 rows on CUDA (decode at small batches, a verify step): up to
    `gemv_kernel.MAX_ROWS` the Triton GEMV of `gemv_kernel`, since cuBLAS reads the weights at a fraction of
    the bandwidth there, and up to `split_k_gemm.MAX_ROWS` its split-K GEMM, which reads them while the
    kernel before it runs. Eager, their Python launch costs a little more host time than cuBLAS's; decode
    runs in CUDA graphs, whose warm-up (eager, before capture) is also where the kernels get compiled."""
    if x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous():
        from nanovllm.layers import gemv_kernel, split_k_gemm

        if x.shape[0] <= gemv_kernel.MAX_ROWS:
            return gemv_kernel.gemv(x, weight, bias)
        if x.shape[0] <= split_k_gemm.MAX_ROWS:
            return split_k_gemm.split_k_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def _parameters(module: nn.Module, input_size: int, output_size: int, bias: bool) -> None:
    module.weight = nn.Parameter(torch.empty(output_size, input_size))
    if bias:
        module.bias = nn.Parameter(torch.empty(output_size))
    else:
        module.register_parameter("bias", None)
    for param in module.parameters():
        param.weight_loader = module.weight_loader


class MergedColumnParallelLinear(nn.Module):
    """y = x W^T + b for W the stacked projections `output_sizes`, this rank's rows of each.

    shard_id is the index in output_sizes (gate_up_proj) or a name in `shard_names`.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, shard_names: tuple = (),
                 tp: TensorParallel = SINGLE, local_sizes: list[int] | None = None):
        super().__init__()
        self.tp = tp
        self.output_sizes = output_sizes  # in the checkpoint
        self.local_sizes = local_sizes or [tp.split(n) for n in output_sizes]  # on this rank
        self.shard_names = shard_names
        _parameters(self, input_size, sum(self.local_sizes), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def shard_start(self, index: int) -> int:
        """Where this rank's rows of shard `index` start in the checkpoint tensor."""
        return self.tp.rank * self.local_sizes[index]

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        index = self.shard_names.index(shard_id) if shard_id in self.shard_names else shard_id
        target = param.data.narrow(0, sum(self.local_sizes[:index]), self.local_sizes[index])
        copy_slice(target, loaded, 0, self.shard_start(index), self.output_sizes[index],
                   what=f"checkpoint shard {shard_id!r}")


class QKVParallelLinear(MergedColumnParallelLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TensorParallel = SINGLE):
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.local_kv_heads = local_kv_heads(num_kv_heads, tp)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        local_q, local_kv = tp.split(num_heads) * head_dim, self.local_kv_heads * head_dim
        super().__init__(hidden_size, sizes, bias, ("q", "k", "v"), tp, [local_q, local_kv, local_kv])

    def shard_start(self, index: int) -> int:
        if index == 0:
            return super().shard_start(index)
        first_head = self.tp.rank * self.num_kv_heads // self.tp.size  # ranks sharing a head read the same
        return first_head * self.head_dim


def local_kv_heads(num_kv_heads: int, tp: TensorParallel) -> int:
    """The KV heads a rank holds: its share, or one (replicated) when there are more ranks than heads."""
    return max(1, num_kv_heads // tp.size)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks and the partial products all-reduced.

    The bias is added once, on rank 0, before the sum. Without `reduce_results` (vLLM's name) the
    layer returns this rank's partial sum, for a layer after it to reduce (`RMSNorm` with `tp`).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TensorParallel = SINGLE,
                 reduce_results: bool = True):
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.reduce_results = reduce_results
        _parameters(self, tp.split(input_size), output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(out) if self.reduce_results else out

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        if param is self.bias:
            copy_slice(param.data, loaded)
        else:
            copy_slice(param.data, loaded, 1, self.tp.rank * param.shape[1], self.input_size)
