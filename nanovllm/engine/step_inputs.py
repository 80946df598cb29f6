"""One step's model inputs as host arrays: everything a rank needs to run the step's forward.

Rank 0 builds them from a scheduled batch. Tensor-parallel workers get them as one packed
int64 message (`pack`/`unpack`): a header of sizes and flags, then the arrays back to back;
no Python object is pickled per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.attention.metadata import BatchLayout

_HEADER = 13  # int64s before the arrays


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [T] int64; decode padding rows read token 0
    prev_rows: np.ndarray  # decode, verify: each token's row in the last step's samples, -1 if in input_ids; else []
    logit_rows: np.ndarray  # [S] the query tokens whose logits are sampled, in sampling order
    layout: BatchLayout
    block_copies: np.ndarray  # [C, 2] (src, dst): copy-on-write, in every layer before the forward
    is_decode: bool
    num_seqs: int  # real rows (a CUDA graph runs padded ones too)
    graphed: bool  # replays a decode CUDA graph
    vocab_parallel: bool = False  # every rank samples from its vocabulary shard (`sampler.sample_vocab_shard`)

    def pack(self) -> bytes:
        layout = self.layout
        rows, width = layout.block_tables.shape
        header = [len(self.input_ids), len(self.prev_rows), len(self.logit_rows), rows, width,
                  len(self.block_copies), layout.max_query_len, layout.max_seq_len, layout.has_prefix,
                  self.is_decode, self.num_seqs, self.graphed, self.vocab_parallel]
        arrays = [self.input_ids, self.prev_rows, self.logit_rows, *layout.arrays(), self.block_copies]
        return np.concatenate([np.asarray(header), *(a.ravel() for a in arrays)], dtype=np.int64).tobytes()

    @classmethod
    def unpack(cls, message: bytes) -> "StepInputs":
        data = np.frombuffer(message, dtype=np.int64).copy()
        (num_tokens, num_prev, num_logits, rows, width, num_copies, max_query_len, max_seq_len, has_prefix,
         is_decode, num_seqs, graphed, vocab_parallel) = data[:_HEADER].tolist()
        sizes = [num_tokens, num_prev, num_logits, num_tokens, rows + 1, rows, rows + 1, num_tokens, rows * width,
                 rows, 2 * num_copies]
        (ids, prev, logits, positions, query_start, seq_lens, seq_start, slots, tables, order,
         copies) = np.split(data[_HEADER:], np.cumsum(sizes)[:-1])
        layout = BatchLayout(positions, query_start, seq_lens, seq_start, slots, tables.reshape(rows, width), order,
                             max_query_len, max_seq_len, bool(has_prefix))
        return cls(ids, prev, logits, layout, copies.reshape(num_copies, 2), bool(is_decode), num_seqs, bool(graphed),
                   bool(vocab_parallel))
