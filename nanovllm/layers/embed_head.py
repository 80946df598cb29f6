"""The token embedding and the LM head, split by vocabulary rows across tensor-parallel ranks.

Rank r holds rows [r * shard, (r + 1) * shard) with shard = ceil(vocab / ranks); rows past the
vocabulary are zero padding. The embedding all-reduces each rank's rows (zeros for tokens it does
not hold); the LM head's logits are gathered on rank 0, the one that samples, or stay on their
ranks when the sampler draws from each shard (`sampler.sample_vocab_shard`).

Logits are float32 whatever the model dtype (the GEMM reads bf16/fp16 and accumulates in float32
anyway): rounded to bf16, the top two logits of the default model tie at 3.3 % of greedy
positions, and a tie is a coin flip against float32's choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import SINGLE, TensorParallel
from nanovllm.layers.weight_slice import Loaded, copy_slice


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        rows = max(0, min(self.shard, self.vocab_size - self.start))
        copy_slice(param.data.narrow(0, 0, rows), loaded, 0, self.start, self.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.start + self.shard)
        hidden = F.embedding(torch.where(mine, input_ids - self.start, 0), self.weight)
        return self.tp.all_reduce(hidden * mine.unsqueeze(-1).to(hidden.dtype))


def float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] @ weight.T in float32: on CUDA the Triton GEMV for one row (decode at batch 1 reads
    the whole vocabulary's weights for it), else cuBLAS's half-precision GEMM with a float32 output
    (call BF: at 5 rows SmolLM2's LM head 16 µs against the GEMV's 45, Qwen3-0.6B's 77 against 141; at 2
    rows within 5 µs either way); elsewhere the same products (exact in float32) from widened operands."""
    if hidden.dtype == torch.float32:
        return F.linear(hidden, weight)
    if hidden.is_cuda:
        from nanovllm.layers.gemv_kernel import gemv

        if hidden.shape[0] == 1 and hidden.is_contiguous():
            return gemv(hidden, weight, out_dtype=torch.float32)
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    return F.linear(hidden.float(), weight.float())


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to float32 vocabulary logits; may share the embedding's weight."""

    def forward(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 and None on the other ranks; without `gather`, every rank's
        own shard of the vocabulary (padding columns past the vocabulary included)."""
        logits = float32_logits(hidden, self.weight)
        if not gather:
            return logits
        logits = self.tp.gather_last_dim(logits)
        return logits[..., : self.vocab_size] if logits is not None and self.tp.size > 1 else logits
