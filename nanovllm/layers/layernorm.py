from __future__ import annotations

import torch
from torch import nn

from nanovllm.distributed.parallel_state import SINGLE, TensorParallel
from nanovllm.layers import fused_kernels
from nanovllm.utils.fusion import on_cuda_use


@on_cuda_use(fused_kernels.rms_norm)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@on_cuda_use(fused_kernels.add_rms_norm)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x + residual (in the model dtype, as HF adds), normalised; and the new residual."""
    residual = x + residual
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual


class RMSNorm(nn.Module):
    """RMSNorm, with the residual add before it when given a residual.

    With `tp` the x that comes with a residual is a row-parallel layer's un-reduced output (this
    rank's partial sum): it is all-reduced here, in the same kernel as the add and the norm where
    the one-shot all-reduce takes the message (a decode step on CUDA), else before them.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, tp: TensorParallel = SINGLE):
        super().__init__()
        self.eps = eps
        self.tp = tp
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        if self.tp.size > 1:
            one_shot = self.tp.one_shot
            if one_shot is not None and one_shot.fits_rows(x, residual):
                return one_shot.add_rms_norm(x, residual, self.weight, self.eps)
            x = self.tp.all_reduce(x)
        return add_rms_norm(x, residual, self.weight, self.eps)
