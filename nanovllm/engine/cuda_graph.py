"""CUDA graphs of the forward over fixed-shape steps: decode, and speculative verification."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Captures the model's forward for each bucket of rows and replays it.

    Decode graphs run one token per row. With `verify_query_len` q (k + 1 for k speculative
    tokens), graphs of up to `max_verify_rows` rows run q query tokens per row: a verify
    step's sequences own their first tokens of the row-major token buffer (each at most q),
    the rest is padding no row owns; padding rows own none. Inputs live in static buffers;
    a batch of n sequences runs the graph of the smallest bucket >= n, its padding writing
    nowhere (slot -1) and attending to nothing (sequence length 0). Metadata shapes are
    fixed: `max_seq_len` is max_model_len and block tables are max_blocks_per_seq wide. A
    step's tables come as wide as its longest sequence needs and only those columns are
    copied: the kernels read a row's entries only up to its length, so the columns past them
    (earlier steps' block ids, or zeros) are never used. At 16-token pages that keeps a
    256-sequence step's tables at what the batch holds, not max_model_len's 256 columns.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, hidden_size: int,
                 dtype: torch.dtype, max_model_len: int, device: torch.device, verify_query_len: int = 1,
                 max_verify_rows: int = 0):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.verify_query_len = verify_query_len
        self.verify_sizes = graph_batch_sizes(min(max_verify_rows, max_num_seqs)) \
            if verify_query_len > 1 and max_verify_rows > 0 else []
        self.max_model_len = max_model_len
        self.table_width = max_blocks_per_seq
        n = self.sizes[-1]
        tokens = max(n, (self.verify_sizes[-1] if self.verify_sizes else 0) * verify_query_len)
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.decode_query_start = torch.arange(n + 1, dtype=torch.int32, device=device)  # never changes
        self.verify_query_start = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.seq_start_loc = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(tokens, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays: Counter[tuple[int, int]] = Counter()  # by (rows, query tokens per row)
        self._capture(model)

    def _meta(self, size: int, query_len: int) -> AttentionMetadata:
        query_start = self.decode_query_start if query_len == 1 else self.verify_query_start
        return AttentionMetadata(query_start[: size + 1], self.seq_lens[:size], self.seq_start_loc[: size + 1],
                                 self.slot_mapping[: size * query_len], self.block_tables[:size], query_len,
                                 self.max_model_len, True)

    @torch.inference_mode()
    def _capture(self, model: nn.Module) -> None:
        pool = None
        shapes = [(size, 1) for size in reversed(self.sizes)]
        shapes += [(size, self.verify_query_len) for size in reversed(self.verify_sizes)]
        for size, query_len in shapes:
            meta, tokens = self._meta(size, query_len), size * query_len
            model(self.input_ids[:tokens], self.positions[:tokens], meta)  # warm up (lazy init, autotune)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:tokens] = model(self.input_ids[:tokens], self.positions[:tokens], meta)
            pool = pool or graph.pool()
            self.graphs[size, query_len] = graph
        torch.cuda.synchronize()

    def reset(self) -> None:
        """Free every graph. Under tensor parallelism this must come before leaving the group: NCCL's
        teardown hangs while a graph that captured its collectives lives (pytorch/pytorch#115388;
        measured: TP=2 on two H200s never exited)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def bucket(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def verify_bucket(self, num_seqs: int) -> int | None:
        """The verify graph's rows for num_seqs sequences; None when none is that large."""
        return next((s for s in self.verify_sizes if s >= num_seqs), None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            num_seqs: int) -> torch.Tensor:
        """Inputs already padded to a graph's shape (rows = meta's, tokens = rows x its query length).

        Returns decode's hidden states of the first num_seqs rows, or a verify step's of every token.
        """
        size, query_len = meta.num_seqs, meta.max_query_len
        tokens = input_ids.shape[0]
        assert tokens == size * query_len, f"{tokens} tokens for a graph of {size} x {query_len}"
        self.input_ids[:tokens].copy_(input_ids)
        self.positions[:tokens].copy_(positions)
        self.slot_mapping[:tokens].copy_(meta.slot_mapping)
        if query_len > 1:
            self.verify_query_start[: size + 1].copy_(meta.query_start_loc)
        self.seq_lens[:size].copy_(meta.seq_lens)
        self.seq_start_loc[: size + 1].copy_(meta.seq_start_loc)
        self.block_tables[:size, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size, query_len].replay()
        self.replays[size, query_len] += 1
        return self.hidden[:num_seqs] if query_len == 1 else self.hidden[:tokens]
