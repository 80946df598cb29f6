"""CUDA graphs of the decode forward, one per bucketed batch size."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.layers.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Captures the model's decode forward for each bucket size and replays it.

    Inputs live in static buffers; a batch of n sequences runs the graph of the
    smallest bucket >= n, its padding rows writing nowhere (slot -1) and
    attending to nothing (context length 0).
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, max_model_len: int, device: torch.device):
        self.sizes = graph_batch_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture(model, max_model_len)

    def _meta(self, size: int, max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:size],
                                 context_lens=self.context_lens[:size], block_tables=self.block_tables[:size],
                                 max_context_len=max_model_len)

    @torch.inference_mode()
    def _capture(self, model: nn.Module, max_model_len: int) -> None:
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size, max_model_len)
            model(self.input_ids[:size], self.positions[:size], meta)  # warm up (lazy init, autotune)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:size] = model(self.input_ids[:size], self.positions[:size], meta)
            pool = pool or graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def bucket(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """Inputs already padded to a bucket size; returns the hidden states of the first num_seqs rows."""
        size, width = block_tables.shape
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.slot_mapping[:size].copy_(slot_mapping)
        self.context_lens[:size].copy_(context_lens)
        self.block_tables[:size, :width].copy_(block_tables)
        self.graphs[size].replay()
        return self.hidden[:num_seqs]
