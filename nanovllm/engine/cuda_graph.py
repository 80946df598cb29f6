"""CUDA graphs of fixed-shape steps, decode and speculative verification, and their inputs.

A graph runs a whole step on the device: each row's input token (from the host, or the token
sampled for it the step before, still on the device), the forward, and on a single rank the LM
head and a plain draw (temperature or greedy: `sampler.draw_plain`) at every query token. A step
whose rows ask for more (filters, penalties, logprobs) hands the graph's logits to the sampler.
At a small batch the host's work per step is what sets the pace, so everything a step does in
the graph is host time saved: the ops of the LM head, the draw and the token lookup, and the
inputs' copies, which arrive in one upload (`StaticInputs`).
"""
from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.engine.step_inputs import StepInputs
from nanovllm.engine.uploader import Uploader, byte_offsets, unpack
from nanovllm.layers.sampler import DrawArrays, draw_plain
from nanovllm.utils.compile_ahead import compile_ahead

# (name, dtype, per token or per row) of each array a graph reads, in their order in the buffer
_FIELDS = (("input_ids", np.int64, "token"), ("prev_rows", np.int64, "token"), ("positions", np.int64, "token"),
           ("slot_mapping", np.int64, "token"), ("keys", np.int64, "token2"), ("inv_t", np.float32, "token"),
           ("query_start_loc", np.int32, "row1"), ("seq_lens", np.int32, "row"), ("seq_start_loc", np.int32, "row1"),
           ("seq_order", np.int32, "row"), ("greedy", np.bool_, "token"))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class StaticInputs:
    """Every array the graphs read, at fixed places: one device buffer of arrays sized for the
    largest graph (a graph reads their prefixes), and the block tables [rows, max_blocks_per_seq].

    `load` writes a step's arrays where the buffer holds them and its tables (as wide as its
    longest sequence needs) after them, in one host-to-device copy, then moves both into place:
    three operations, where a copy per array cost a host round of the dispatcher each.
    """

    def __init__(self, max_tokens: int, max_rows: int, max_blocks_per_seq: int, device: torch.device):
        counts = {"token": max_tokens, "token2": 2 * max_tokens, "row": max_rows, "row1": max_rows + 1}
        shapes = [np.empty(counts[kind], dtype) for _, dtype, kind in _FIELDS]
        self.offsets, self.size = byte_offsets(shapes)
        self.buffer = torch.zeros(self.size, dtype=torch.uint8, device=device)
        (self.input_ids, self.prev_rows, self.positions, self.slot_mapping, keys, self.inv_t, self.query_start_loc,
         self.seq_lens, self.seq_start_loc, self.seq_order, self.greedy) = unpack(self.buffer, shapes, self.offsets)
        self.keys = keys.view(max_tokens, 2)
        self.block_tables = torch.zeros(max_rows, max_blocks_per_seq, dtype=torch.int32, device=device)

    def load(self, upload: Uploader, step: StepInputs, draw: DrawArrays | None,
             extra: list[np.ndarray]) -> list[torch.Tensor]:
        """Put the step's inputs in place: its layout (padded to a graph's shape), the draw's (inv_t,
        greedy, keys) at each query token (None: nothing is drawn, and those arrays then hold
        anything), and `extra` arrays, returned on the device in their order."""
        layout = step.layout
        num_tokens = len(step.input_ids)
        prev_rows = step.prev_rows if len(step.prev_rows) else np.full(num_tokens, -1, dtype=np.int64)
        inv_t, greedy, keys = draw if draw is not None else (None, None, None)
        values = (step.input_ids, prev_rows, layout.positions, layout.slot_mapping, keys, inv_t,
                  layout.query_start_loc, layout.seq_lens, layout.seq_start_loc, layout.seq_order, greedy)
        chunks = [(offset, np.asarray(a, dtype)) for offset, a, (_, dtype, _) in zip(self.offsets, values, _FIELDS)
                  if a is not None]
        tables = np.asarray(layout.block_tables, dtype=np.int32)
        extra_offsets, extra_size = byte_offsets([tables, *extra])
        chunks += [(self.size + offset, a) for offset, a in zip(extra_offsets, [tables, *extra])]
        device = upload.raw(chunks, self.size + extra_size)
        self.buffer.copy_(device[: self.size])
        rows, width = tables.shape
        self.block_tables[:rows, :width].copy_(device[self.size : self.size + tables.nbytes].view(torch.int32)
                                               .view(rows, width))
        return unpack(device[self.size :], [tables, *extra], extra_offsets)[1:]


class DecodeGraphs:
    """Captures a step for each bucket of rows and replays it.

    Decode graphs run one token per row. With `verify_query_len` q (k + 1 for k speculative
    tokens), graphs of up to `max_verify_rows` rows run q query tokens per row: a verify
    step's sequences own their first tokens of the row-major token buffer (each at most q),
    the rest is padding no row owns; padding rows own none. A batch of n sequences runs the
    graph of the smallest bucket >= n, its padding writing nowhere (slot -1) and attending to
    nothing (sequence length 0). Metadata shapes are fixed: `max_seq_len` is max_model_len
    and block tables are max_blocks_per_seq wide. A step's tables come as wide as its longest
    sequence needs and only those columns are copied: the kernels read a row's entries only up
    to its length, so the columns past them (earlier steps' block ids, or zeros) are never used.
    At 16-token pages that keeps a 256-sequence step's tables at what the batch holds, not
    max_model_len's 256 columns.

    `tokens` holds the last step's sampled tokens, row by row in sampling order: a graph's
    draw writes them there, and the runner copies there what an eager step samples, so the
    next step's rows can read theirs (`prev_rows`); it has room for `max_sampled_rows`, the
    most rows any step samples. With `sample` (a single rank) a graph
    ends in the logits (float32) and a plain draw at every query token; without (tensor
    parallelism, where the ranks sample together), in the hidden states.

    Without `capture` nothing is recorded and a replay runs the step eagerly: the same inputs,
    lookup, forward and draw, so that the path can be tested where there is no CUDA.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device, sample: bool, max_sampled_rows: int, verify_query_len: int = 1,
                 max_verify_rows: int = 0, capture: bool = True):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.verify_query_len = verify_query_len
        self.verify_sizes = graph_batch_sizes(min(max_verify_rows, max_num_seqs)) \
            if verify_query_len > 1 and max_verify_rows > 0 else []
        self.max_model_len = max_model_len
        self.sample = sample
        n = self.sizes[-1]
        tokens = max(n, (self.verify_sizes[-1] if self.verify_sizes else 0) * verify_query_len)
        self.inputs = StaticInputs(tokens, n, max_blocks_per_seq, device)
        self.tokens = torch.zeros(max(tokens, max_sampled_rows), dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # each graph's logits, or hidden states
        self.replays: Counter[tuple[int, int]] = Counter()  # by (rows, query tokens per row)
        self.model = model
        self.capture = capture
        if capture:
            self._capture(model)

    def _meta(self, size: int, query_len: int) -> AttentionMetadata:
        i = self.inputs
        return AttentionMetadata(i.query_start_loc[: size + 1], i.seq_lens[:size], i.seq_start_loc[: size + 1],
                                 i.slot_mapping[: size * query_len], i.block_tables[:size], i.seq_order[:size],
                                 query_len, self.max_model_len, True)

    def _step(self, model: nn.Module, size: int, query_len: int) -> torch.Tensor:
        """What a graph runs: logits (and the draw into `tokens`) with `sample`, else hidden states."""
        i, n = self.inputs, size * query_len
        src = i.prev_rows[:n]
        ids = torch.where(src >= 0, self.tokens[src.clamp(min=0)], i.input_ids[:n])
        hidden = model(ids, i.positions[:n], self._meta(size, query_len))
        if not self.sample:
            return hidden
        logits = model.compute_logits(hidden)
        self.tokens[:n] = draw_plain(logits, i.inv_t[:n], i.greedy[:n], i.keys[:n])
        return logits

    @torch.inference_mode()
    def _capture(self, model: nn.Module) -> None:
        pool = None
        shapes = [(size, 1) for size in reversed(self.sizes)]
        shapes += [(size, self.verify_query_len) for size in reversed(self.verify_sizes)]
        compile_ahead(self.tokens.device, partial(self._steps_on_input_ids, model, shapes))
        for size, query_len in shapes:
            self._step(model, size, query_len)  # warm up (lazy init, autotune)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size, query_len] = self._step(model, size, query_len)
            pool = pool or graph.pool()
            self.graphs[size, query_len] = graph
        torch.cuda.synchronize()

    def _steps_on_input_ids(self, model: nn.Module, shapes: list[tuple[int, int]]) -> None:
        """Each shape's step with every row's token from `input_ids`, none from `tokens`: under
        `compile_ahead` a draw whose kernel is being built leaves garbage there, which the embedding
        would index with. Leaves the inputs and `tokens` as they were (zeros)."""
        self.inputs.prev_rows.fill_(-1)
        for size, query_len in shapes:
            self._step(model, size, query_len)
        self.inputs.prev_rows.zero_()
        self.tokens.zero_()

    def reset(self) -> None:
        """Free every graph. Under tensor parallelism this must come before leaving the group: NCCL's
        teardown hangs while a graph that captured its collectives lives (pytorch/pytorch#115388;
        measured: TP=2 on two H200s never exited)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def bucket(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    def verify_bucket(self, num_seqs: int) -> int | None:
        """The verify graph's rows for num_seqs sequences; None when none is that large."""
        return next((s for s in self.verify_sizes if s >= num_seqs), None)

    def load(self, upload: Uploader, step: StepInputs, draw: DrawArrays | None,
             extra: list[np.ndarray]) -> list[torch.Tensor]:
        """Load a step padded to a graph's shape (`StaticInputs.load`); `draw` with `sample`."""
        assert (draw is not None) == self.sample
        return self.inputs.load(upload, step, draw, extra)

    def replay(self, step: StepInputs) -> torch.Tensor:
        """Replay the graph of the loaded step's shape: its output (see the class docstring), valid
        until the next replay."""
        rows, query_len = step.layout.block_tables.shape[0], step.layout.max_query_len
        tokens = len(step.input_ids)
        assert tokens == rows * query_len, f"{tokens} tokens for a graph of {rows} x {query_len}"
        self.replays[rows, query_len] += 1
        if not self.capture:
            return self._step(self.model, rows, query_len)
        self.graphs[rows, query_len].replay()
        return self.outputs[rows, query_len]
