"""What attention knows about a batch: its shape, built once on the host and uploaded in one copy.

There are no phases. A batch is B sequences with T query tokens in all; sequence i
computes its last `query_len[i]` tokens of `seq_len[i]`, attending causally to
everything before them in the cache. A batch whose `max_query_len` is 1 is what
decode kernels (and decode CUDA graphs) run; several query tokens over a cached
prefix (chunked prefill, prefix-cache hits, speculative verification) is just
another shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """A batch's shape on the device, handed down the model's forward.

    - `query_start_loc` [B+1] int32: sequence i's query tokens are `query_start_loc[i]:[i+1]`.
    - `seq_lens` [B] int32: tokens of sequence i in the cache once this step's K/V are
      written (its queries are the last of them); 0 for a padding row.
    - `seq_start_loc` [B+1] int32: the running sum of `seq_lens` (flash-attn's cu_seqlens_k).
    - `slot_mapping` [T] int64: the cache slot (block * block_size + offset) each query
      token's K/V go to; -1 for padding, written nowhere.
    - `block_tables` [B, W] int32: physical blocks of each sequence; unused entries hold 0.
    - `seq_order` [B] int32: the rows by decreasing `seq_lens`, the order in which the decode
      kernel's programs take them in a large batch (`triton_decode.longest_first_pays`): the
      longest start first and the short ones fill the tail (launched in row order, a long
      sequence's programs could start last and run alone).
    - `max_query_len`, `max_seq_len`: host ints, upper bounds (a CUDA graph passes max_model_len).
    - `has_prefix`: some sequence attends to tokens cached before this step.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    seq_start_loc: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_order: torch.Tensor
    max_query_len: int
    max_seq_len: int
    has_prefix: bool

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class BatchLayout:
    """The host (numpy) side of a batch: token positions and the metadata's arrays."""

    positions: np.ndarray  # [T] int64
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    seq_start_loc: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_order: np.ndarray
    max_query_len: int
    max_seq_len: int
    has_prefix: bool

    def arrays(self) -> list[np.ndarray]:
        """What to upload, in the order `metadata` takes the device tensors back."""
        return [self.positions, self.query_start_loc, self.seq_lens, self.seq_start_loc, self.slot_mapping,
                self.block_tables, self.seq_order]

    def metadata(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, AttentionMetadata]:
        """(positions, metadata) from the uploaded `arrays()`, int64 on arrival."""
        positions, query_start, seq_lens, seq_start, slots, tables, order = tensors
        return positions, AttentionMetadata(
            query_start.int(), seq_lens.int(), seq_start.int(), slots, tables.int(), order.int(),
            self.max_query_len, self.max_seq_len, self.has_prefix)


def longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """Row indices by decreasing length (ties in row order): `AttentionMetadata.seq_order`."""
    return np.argsort(-seq_lens, kind="stable")


def build_layout(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                 num_rows: int | None = None, table_width: int | None = None,
                 max_seq_len: int | None = None, num_tokens: int | None = None,
                 max_query_len: int | None = None) -> BatchLayout:
    """The layout of a batch where sequence i computes its last `query_lens[i]` of `seq_lens[i]` tokens.

    `num_rows` pads the batch with rows that write nowhere and attend to nothing (a CUDA graph's
    fixed shape): each pads with one token (decode), or, when `num_tokens` is given (a graph of
    several query tokens per row, speculative verification), with none, the token arrays then
    padded to `num_tokens` with tokens no row owns. `table_width`, `max_seq_len` and
    `max_query_len` fix those sizes too.
    """
    n = len(query_lens)
    rows = num_rows or n
    q_lens = np.full(rows, 0 if num_tokens is not None else 1, dtype=np.int64)
    q_lens[:n] = query_lens
    s_lens = np.zeros(rows, dtype=np.int64)
    s_lens[:n] = seq_lens
    width = table_width or max((len(t) for t in block_tables), default=1) or 1
    tables = np.zeros((rows, width), dtype=np.int64)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = table
    query_start = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(q_lens, out=query_start[1:])
    seq_start = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(s_lens, out=seq_start[1:])
    owned = int(query_start[-1])
    total = owned if num_tokens is None else num_tokens
    assert total >= owned, f"{owned} query tokens do not fit in {total}"
    row_of_token = np.repeat(np.arange(rows), q_lens)
    positions = np.zeros(total, dtype=np.int64)
    positions[:owned] = np.arange(owned) - query_start[row_of_token] + (s_lens - q_lens)[row_of_token]
    real = np.zeros(total, dtype=bool)
    real[:owned] = row_of_token < n
    slots = np.full(total, -1, dtype=np.int64)
    p = positions[real]
    slots[real] = tables[row_of_token[real[:owned]], p // block_size] * block_size + p % block_size
    positions = np.maximum(positions, 0)
    return BatchLayout(positions, query_start, s_lens, seq_start, slots, tables, longest_first(s_lens),
                       max_query_len=max_query_len or int(q_lens.max(initial=1)),
                       max_seq_len=max_seq_len or int(s_lens.max(initial=1)),
                       has_prefix=bool((s_lens[:n] > q_lens[:n]).any()))
