"""CUDA graphs of the decode forward, one per bucketed batch size."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Captures the model's forward over 1-token rows for each bucket size and replays it.

    Inputs live in static buffers; a batch of n sequences runs the graph of the
    smallest bucket >= n, its padding rows writing nowhere (slot -1) and
    attending to nothing (sequence length 0). Metadata shapes are fixed:
    `max_seq_len` is max_model_len and block tables are max_blocks_per_seq wide.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, max_model_len: int, device: torch.device):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.table_width = max_blocks_per_seq
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.meta = AttentionMetadata(
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(n, dtype=torch.int32, device=device),
            seq_start_loc=torch.zeros(n + 1, dtype=torch.int32, device=device),
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device),
            max_query_len=1, max_seq_len=max_model_len, has_prefix=True)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture(model)

    def _meta(self, size: int) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(m.query_start_loc[: size + 1], m.seq_lens[:size], m.seq_start_loc[: size + 1],
                                 m.slot_mapping[:size], m.block_tables[:size], 1, self.max_model_len, True)

    @torch.inference_mode()
    def _capture(self, model: nn.Module) -> None:
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size)
            model(self.input_ids[:size], self.positions[:size], meta)  # warm up (lazy init, autotune)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:size] = model(self.input_ids[:size], self.positions[:size], meta)
            pool = pool or graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def bucket(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            num_seqs: int) -> torch.Tensor:
        """Inputs already padded to a bucket size; returns the hidden states of the first num_seqs rows."""
        size = input_ids.shape[0]
        static = self.meta
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        static.seq_lens[:size].copy_(meta.seq_lens)
        static.seq_start_loc[: size + 1].copy_(meta.seq_start_loc)
        static.slot_mapping[:size].copy_(meta.slot_mapping)
        static.block_tables[:size].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.hidden[:num_seqs]
