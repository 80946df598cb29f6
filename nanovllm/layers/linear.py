"""Linear layers, including the fused projections that load several HF weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    Loads each HF weight into its slice: shard_id is the index in output_sizes
    (gate_up_proj) or a name in `shard_names` (qkv_proj: "q", "k", "v").
    The checkpoint loader calls `param.weight_loader`.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, shard_names: tuple = ()):
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.shard_names = shard_names
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        index = self.shard_names.index(shard_id) if shard_id in self.shard_names else shard_id
        offset = sum(self.output_sizes[:index])
        target = param.data.narrow(0, offset, self.output_sizes[index])
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint shard {shard_id!r} of shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
        target.copy_(loaded)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, shard_names=("q", "k", "v"))
