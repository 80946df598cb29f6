import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers import fused_kernels
from nanovllm.utils.fusion import on_cuda_use


@on_cuda_use(fused_kernels.silu_and_mul)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """silu(gate) * up for a gate_up projection laid out as [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
