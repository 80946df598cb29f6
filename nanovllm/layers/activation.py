import torch
import torch.nn.functional as F

from nanovllm.layers import fused_kernels
from nanovllm.utils.fusion import on_cuda_use


@on_cuda_use(fused_kernels.silu_and_mul)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up

