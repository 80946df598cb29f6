"""Runs the model on a scheduled batch: flat inputs, the forward over the paged cache, sampling."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from nanovllm.attention.kv_cache import KVCache, kv_cache_torch_dtype
from nanovllm.attention.metadata import build_layout
from nanovllm.attention.selector import select_backend
from nanovllm.config import Config
from nanovllm.distributed.parallel_state import SINGLE, TensorParallel
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.kv_calibration import FP8Calibration, calibrate, calibration_token_ids
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.engine.step_inputs import StepInputs
from nanovllm.engine.uploader import Uploader
from nanovllm.layers.attention import Attention
from nanovllm.layers.rotary_embedding import RotaryEmbedding, hadamard
from nanovllm.layers.sampler import (Sampler, SamplerOutput, SamplingArrays, SamplingRow, SamplingTensors,
                                     best_of_shards, sample_vocab_shard)
from nanovllm.models import model_class
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec_decode.verify_row import VerifyRow
from nanovllm.utils.compile_ahead import BUILD_TIME, compile_ahead
from nanovllm.utils.loader import load_dummy, load_model

if TYPE_CHECKING:
    from nanovllm.distributed.worker_pool import WorkerPool

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SampledTokens:
    """A step's sampled tokens on the host, row by row as in the batch's sampling sequences."""

    token_ids: list[int]
    logprobs: list[float] | None  # None when no row asked for logprobs
    top_token_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


def padded_tokens(n: int) -> int:
    """The query tokens an eager prefill or verify step of n tokens runs on CUDA, the rest padding that no
    sequence owns: a power of two up to 1,024, then a multiple of 512. cuBLAS chooses its kernel on its
    first call at each new row count, ~4 ms of host time per GEMM shape (call BY, H200): at batch 1 a
    1-2k-token prefill took 27-38 ms, of which 2.7 ms on the device. Rounded, a few counts recur."""
    return 1 << (n - 1).bit_length() if n <= 1024 else -(-n // 512) * 512


class PendingSample:
    """Sampled tokens on their way to the host; `wait` blocks until they are there."""

    def __init__(self, out: SamplerOutput | None):
        self.out = out
        self.event = None
        if out is None:
            return
        # copies taken now: the next step may overwrite what they view (the graphs' `tokens`) before `wait`
        cuda = out.token_ids.is_cuda
        self.out = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True) if cuda else t.clone()
                                   for t in (out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)))
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> SampledTokens | None:
        if self.out is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        out = self.out
        top = out.top_token_ids is not None
        return SampledTokens(out.token_ids.tolist(), out.logprobs.tolist() if out.logprobs is not None else None,
                             out.top_token_ids.tolist() if top else None, out.top_logprobs.tolist() if top else None)


class ModelRunner:
    """Owns the model, the KV cache and the sampler on one device.

    Under tensor parallelism every rank has one, holding its shard of the model and the KV
    cache of its KV heads. Rank 0's (given the `workers`) turns batches into `StepInputs`,
    sends them to the workers and samples; a worker's runs each step it gets (`follow`).
    """

    def __init__(self, config: Config, calibration_ids: list[int] | None = None, tp: TensorParallel = SINGLE,
                 workers: WorkerPool | None = None):
        self.config = config
        self.hf_config = config.hf_config
        self.tp = tp
        self.workers = workers
        self.device = tp.device(config.device)
        self.dtype = config.torch_dtype
        self.generator = torch.Generator(self.device).manual_seed(config.seed)  # unseeded sampling
        self.key_rng = np.random.default_rng(config.seed)  # unseeded rows' noise keys, drawn on the host
        self.backend = select_backend(config.attention_backend, self.device, self.dtype, config.kv_cache_dtype)
        self.block_size = self._block_size()
        self.startup_seconds: dict[str, float] = {}  # phase -> seconds, logged once the runner is ready
        self.model = self._timed("load", self._build_model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for attn in self.attention_layers:
            attn.backend = self.backend
        self.sampler = Sampler(self.generator)
        self.upload = Uploader(self.device)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.fp8 = self._timed("FP8 calibration", self._calibrate_fp8, calibration_ids) \
            if config.kv_cache_dtype == "fp8" else None
        self.num_blocks = tp.min_int(config.num_kvcache_blocks or self._timed("warm-up", self._num_blocks_from_memory))
        self.num_sink_blocks = self._sink_blocks(self.num_blocks)
        self.kv_cache = self._timed("KV cache", self._allocate_kv_cache)
        self.graphs = self._capture_graphs()
        # the last launched step's sampled tokens, still on the device, and each sequence's row in them
        self.prev_tokens = self.graphs.tokens if self.graphs is not None else \
            torch.zeros(1, dtype=torch.int64, device=self.device)
        self.prev_rows: dict[int, int] = {}
        self.pad_tokens = self.device.type == "cuda"  # eager steps' token counts rounded up (`padded_tokens`)
        logger.info("startup: %s", ", ".join(f"{name} {t:.1f} s" for name, t in self.startup_seconds.items()))

    def _timed(self, phase: str, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), its wall time (device work included) recorded as a startup phase, less what it
        spent building Triton kernels ahead (`compile_ahead`), which adds to the "Triton builds" phase."""
        start, built = time.perf_counter(), BUILD_TIME.seconds
        result = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        built = BUILD_TIME.seconds - built
        self.startup_seconds[phase] = time.perf_counter() - start - built
        if built:
            self.startup_seconds["Triton builds"] = self.startup_seconds.get("Triton builds", 0.0) + built
        return result

    def _block_size(self) -> int:
        size = self.config.kvcache_block_size or self.backend.default_block_size
        self.backend.check_block_size(size)
        return size

    def _build_model(self) -> torch.nn.Module:
        with torch.device(self.device):
            model = model_class(self.hf_config)(self.hf_config, self.tp)
        if self.config.load_format == "dummy":
            load_dummy(model, self.config.seed)
        else:
            load_model(model, self.config.model)
        return model.to(self.dtype).eval()

    # -- the KV cache -----------------------------------------------------------

    def _layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's K (or V) cache; the KV-head count and head dim come from the model's layers."""
        attn = self.attention_layers[0]
        assert all((a.num_kv_heads, a.head_dim) == (attn.num_kv_heads, attn.head_dim) for a in self.attention_layers)
        return self.backend.kv_cache_shape(num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)

    def _bytes_per_block(self) -> int:
        return 2 * len(self.attention_layers) * int(np.prod(self._layer_shape(1))) * self.kv_dtype.itemsize

    def _num_blocks_from_memory(self) -> int:
        """CUDA: what gpu_memory_utilization leaves after a warm-up's peak. CPU: kv_cache_memory_bytes.

        Either way no more than max_num_seqs full-length sequences can use.
        """
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.config.kv_cache_memory_bytes
        blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        num_blocks = min(budget // self._bytes_per_block(), self.config.max_num_seqs * blocks_per_seq)
        num_blocks -= 2 * self._sink_blocks(num_blocks)  # a float16 sink block is two FP8 blocks' bytes
        if num_blocks < 1:
            raise ValueError(f"no memory left for a KV block of {self._bytes_per_block()} bytes "
                             f"(budget {budget} bytes); lower max_num_batched_tokens or raise the memory limit")
        return num_blocks

    def _sink_blocks(self, num_blocks: int) -> int:
        """With `fp8_sink_blocks`, how many of the cache's blocks are sink blocks, kept in float16 as well
        (`BlockManager`, `LayerKVCache`): one for each of max_num_seqs running sequences and as many again
        for cached prefixes, at most a quarter of the cache."""
        if self.kv_dtype != torch.float8_e4m3fn or not self.config.fp8_sink_blocks:
            return 0
        return min(2 * self.config.max_num_seqs, num_blocks // 4)

    def _cuda_kv_budget(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup()
        free, total = torch.cuda.mem_get_info(self.device)
        peak, current = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        return int(total * self.config.gpu_memory_utilization - (total - free) - (peak - current))

    @torch.inference_mode()
    def _warmup(self) -> None:
        """A prefill of max_num_batched_tokens and sampling of max_num_seqs rows, to measure peak memory.

        The prefill runs over a scratch cache just big enough for it, so any backend can read it back;
        then again with all but one token of each sequence over a cached prefix, the backend's other
        prefill path (Triton: its own kernel rather than flash-attn's), so that the first prefix-cache
        hit of a long prompt does not pay for its JIT compile (measured: 0.5-0.7 s at batch 1). Each
        forward's Triton kernels are built in parallel first (`compile_ahead`).
        """
        num_tokens, bs = self.config.max_num_batched_tokens, self.block_size
        seq_len = min(self.config.max_model_len, num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks = [-(-n // bs) for n in lens]
        first = np.cumsum([0] + blocks)
        tables = [list(range(first[i], first[i] + n)) for i, n in enumerate(blocks)]
        scratch = self._new_kv_cache(sum(blocks), num_sink_blocks=1 if self.kv_dtype == torch.float8_e4m3fn else 0)
        for query_lens in (lens, [max(n - 1, 1) for n in lens]):
            layout = build_layout(query_lens, lens, tables, bs)
            ids, *meta_tensors = self.upload([np.random.randint(0, self.hf_config.vocab_size, sum(query_lens)),
                                              *layout.arrays()])
            forward = partial(self.model, ids, *layout.metadata(meta_tensors))
            compile_ahead(self.device, forward)
            forward()
        seqs = [Sequence(i, [0], SamplingParams()) for i in range(self.config.max_num_seqs)]
        hidden = torch.randn(len(seqs), self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        logits = self.model.compute_logits(hidden)
        if logits is not None:
            self.sampler(logits, self._sampling_tensors(seqs))
        del scratch
        torch.cuda.synchronize(self.device)

    def _new_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None, num_sink_blocks: int = 0) -> KVCache:
        """A cache of num_blocks bound to every attention layer (FP8 with its scales and sink blocks)."""
        dtype = dtype or self.kv_dtype
        kv_cache = KVCache(len(self.attention_layers), self._layer_shape(num_blocks), dtype, self.device,
                           num_sink_blocks, value_dim_major=dtype == torch.float8_e4m3fn)
        if kv_cache.data.dtype == torch.float8_e4m3fn:
            kv_cache.set_scales(self.fp8.k_scales, self.fp8.v_scales, self.fp8.k_offsets)
        for attn, layer_cache in zip(self.attention_layers, kv_cache.layers):
            attn.kv_cache = layer_cache
        return kv_cache

    @torch.inference_mode()
    def _calibrate_fp8(self, token_ids: list[int] | None) -> FP8Calibration:
        """FP8: per-layer, per-KV-head scales, key offsets and rotations of q and k after RoPE (see
        `RotaryEmbedding`) from one forward over calibration tokens (see kv_calibration). The forward
        runs with q and k Hadamard-rotated (head dims that are powers of two), where the rotations start."""
        ropes = [m for m in self.model.modules() if isinstance(m, RotaryEmbedding)]
        attn = self.attention_layers[0]
        assert len(ropes) == len(self.attention_layers)  # one per attention layer, in the same order
        d = attn.head_dim
        start = hadamard(d) if d & (d - 1) == 0 else torch.eye(d)
        for rope in ropes:
            rope.set_mix(start.expand(attn.num_kv_heads, d, d), self.dtype)
        if token_ids is None:
            token_ids = calibration_token_ids(None, self.hf_config.vocab_size, self.config.seed)
        token_ids = token_ids[: min(len(token_ids), self.config.max_model_len, self.config.max_num_batched_tokens)]
        n, bs = len(token_ids), self.block_size
        scratch = self._new_kv_cache(-(-n // bs), dtype=self.dtype)
        queries: dict[int, torch.Tensor] = {}
        keys: dict[int, torch.Tensor] = {}
        values: dict[int, torch.Tensor] = {}

        def record(layer: int):
            def hook(module, args):
                queries[layer], keys[layer], values[layer], _ = args
            return hook

        handles = [attn.register_forward_pre_hook(record(i)) for i, attn in enumerate(self.attention_layers)]
        try:
            layout = build_layout([n], [n], [list(range(-(-n // bs)))], bs)
            ids, *meta_tensors = self.upload([np.asarray(token_ids, dtype=np.int64), *layout.arrays()])
            forward = partial(self.model, ids, *layout.metadata(meta_tensors))
            compile_ahead(self.device, forward)  # what the hooks record there, the real forward replaces
            forward()
        finally:
            for handle in handles:
                handle.remove()
        del scratch
        layers = range(len(self.attention_layers))
        fp8 = calibrate([queries[i] for i in layers], [keys[i] for i in layers], [values[i] for i in layers],
                        attn.scale)
        for rope, rotations in zip(ropes, fp8.k_rotations):
            rope.set_mix(start.to(rotations.device) @ rotations, self.dtype)
        logger.info("FP8 KV scales from %d calibration tokens: key %.3g..%.3g, value %.3g..%.3g", n,
                    fp8.k_scales.min(), fp8.k_scales.max(), fp8.v_scales.min(), fp8.v_scales.max())
        return fp8

    def _allocate_kv_cache(self) -> KVCache:
        kv_cache = self._new_kv_cache(self.num_blocks, num_sink_blocks=self.num_sink_blocks)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s%s)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, kv_cache.num_bytes / 2**30, self.kv_dtype,
                    f"; {self.num_sink_blocks} first blocks also in float16" if self.num_sink_blocks else "")
        return kv_cache

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.backend.supports_cuda_graphs:
            return None
        return self._timed("CUDA graphs", self.decode_graphs, True)

    def decode_graphs(self, capture: bool) -> DecodeGraphs:
        """The runner's `DecodeGraphs`: decode, and verify steps while speculation runs (k + 1 tokens per
        row); without `capture` they run eagerly (tests on CPU)."""
        blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        spec = self.config.speculative_config
        verify = (spec.num_speculative_tokens + 1, spec.disable_by_batch_size) if spec is not None else (1, 0)
        return DecodeGraphs(self.model, min(self.config.max_num_seqs, 512), blocks_per_seq, self.config.max_model_len,
                            self.device, self.tp.size == 1, self.config.max_num_seqs * verify[0], *verify,
                            capture=capture)

    # -- running ----------------------------------------------------------------

    def _input_ids(self, batch: ScheduledBatch, rows: int, num_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Each token's id, and in a decode or verify step each token's row in prev_tokens where its
        id is still on the device (a sequence's first token: sampled by the step before), else -1.
        Padding (rows, or tokens up to `num_tokens`) reads token 0."""
        ids, on_device = [], []
        steps = batch.is_decode or batch.num_proposed is not None
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start : start + n]
            if tokens[0] == PLACEHOLDER:
                assert steps, "a token not read back yet is only read by decode and verify steps"
                on_device.append((len(ids), self.prev_rows.get(seq.seq_id, -1)))
            assert PLACEHOLDER not in tokens[1:], "only a sequence's first new token may be on the device"
            ids.extend(tokens)
        if batch.is_decode:
            ids += [0] * (rows - len(batch.seqs))
        elif num_tokens is not None:
            ids += [0] * (num_tokens - len(ids))
        src = np.full(len(ids) if steps else 0, -1, dtype=np.int64)
        for index, row in on_device:
            src[index] = row
        return np.asarray(ids, dtype=np.int64), src

    def _graph_shape(self, batch: ScheduledBatch) -> tuple[int, int] | None:
        """(rows, query tokens per row) of the CUDA graph that runs the batch, or None (eager).

        Decode runs one token per row. A speculative verify step, where every sequence samples
        its last token and proposals, runs the verify graph of k + 1 tokens per row."""
        if self.graphs is None:
            return None
        n = len(batch.seqs)
        if batch.is_decode:
            return (self.graphs.bucket(n), 1) if n <= self.graphs.sizes[-1] else None
        q = self.graphs.verify_query_len
        if batch.num_proposed is None or not all(batch.sample_counts) or max(batch.num_new_tokens) > q:
            return None
        rows = self.graphs.verify_bucket(n)
        return (rows, q) if rows is not None else None

    def _step_inputs(self, batch: ScheduledBatch) -> tuple[StepInputs, list[SamplingRow]]:
        """The batch's model inputs, and the rows to sample (in the order of its logit rows)."""
        n = len(batch.seqs)
        shape = self._graph_shape(batch)
        graphed = shape is not None
        rows, query_len = shape if graphed else (n, None)
        num_tokens = rows * query_len if graphed and query_len > 1 else None
        if not graphed and not batch.is_decode and self.pad_tokens:
            total = sum(batch.num_new_tokens)
            num_tokens = min(padded_tokens(total), max(total, self.config.max_num_batched_tokens))
        seq_lens = [seq.num_computed_tokens + k for seq, k in zip(batch.seqs, batch.num_new_tokens)]
        layout = build_layout(batch.num_new_tokens, seq_lens, [seq.block_table for seq in batch.seqs],
                              self.block_size, num_rows=rows if graphed else None,
                              max_seq_len=self.config.max_model_len if graphed else None,
                              num_tokens=num_tokens, max_query_len=query_len)
        sampling, logit_rows = self._sampling_rows(batch, layout.query_start_loc)
        copies = np.asarray(batch.block_copies, dtype=np.int64).reshape(-1, 2)
        ids, src = self._input_ids(batch, rows, num_tokens)
        return StepInputs(ids, src, logit_rows, layout, copies, batch.is_decode, n, graphed), sampling

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> PendingSample:
        """Queue the batch's forward and sampling on the device; the tokens come back through `wait`.

        Sampling covers the sequences whose tokens are all computed after this step. The model
        inputs and the sampling parameters go up in one copy.
        """
        step, sampling = self._step_inputs(batch)
        host = SamplingArrays.from_rows(sampling, self.hf_config.vocab_size, self.config.eos_token_ids,
                                        self.key_rng) if sampling else None
        out = self._run_graph(step, host) if step.graphed and self.graphs.sample else self._run(step, host)
        if out is None:
            return PendingSample(None)
        self.prev_rows = {seq.seq_id: row for row, seq in enumerate(sampling)}
        return PendingSample(out)

    def _run(self, step: StepInputs, host: SamplingArrays | None) -> SamplerOutput | None:
        """A step eager, or in a graph without the LM head (tensor parallelism), with its workers: the
        forward, then the sampler (or in a plain decode step on several ranks, a draw from each rank's
        vocabulary shard); None when nothing is sampled."""
        # Plain decode sampling on several ranks: each draws from its own shard of the vocabulary
        step.vocab_parallel = self.tp.size > 1 and step.is_decode and host is not None and host.plain
        with self.workers.watch() if self.workers is not None else nullcontext():
            if self.workers is not None:
                self.workers.send(step)
            logits, uploaded = self.execute(step, host.arrays if host is not None else [])
            if logits is None:
                return None
            t = host.tensors(uploaded)
            if step.vocab_parallel:
                params = torch.stack([*self.sampler.keys(t, self.device).unbind(1),
                                      t.inv_temperatures.view(torch.int32).long(), t.greedy.long()], dim=1)
                out = SamplerOutput(self._vocab_parallel_tokens(logits, self.tp.broadcast(params)), None, None, None)
                self.prev_tokens = self._keep(out.token_ids)
            else:
                out = self.sampler(logits, t)
                self.prev_tokens = self._keep(self.tp.broadcast(out.token_ids))
        return out

    def _run_graph(self, step: StepInputs, host: SamplingArrays) -> SamplerOutput:
        """A step whose CUDA graph also runs the LM head and a plain draw (a single rank): the draw's
        tokens when the rows ask for nothing more, else the sampler's over the graph's logits. Either
        way they end in the graphs' `tokens`, where the next step reads them."""
        tokens, n = self.graphs.tokens, len(step.logit_rows)
        in_order = bool(np.array_equal(step.logit_rows, np.arange(n)))  # decode: always
        extra = [*self._copies_and_rows(step), *([] if host.plain else host.arrays)]
        draw = host.at_tokens(step.logit_rows, len(step.input_ids))
        copy_src, copy_dst, rows_t, *uploaded = self.graphs.load(self.upload, step, draw, extra)
        if len(step.block_copies):
            self.kv_cache.copy_blocks(copy_src, copy_dst)
        logits = self.graphs.replay(step)
        if host.plain:
            if not in_order:
                tokens[:n] = tokens[rows_t]
            return SamplerOutput(tokens[:n], None, None, None)
        out = self.sampler(logits[:n] if in_order else logits[rows_t], host.tensors(uploaded))
        tokens[:n].copy_(out.token_ids)
        return out

    def _keep(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where the next step's rows read the tokens just sampled: the graphs' `tokens` (copied
        there) when there are graphs, whose replays read them there."""
        if self.graphs is None:
            return tokens
        self.graphs.tokens[: len(tokens)].copy_(tokens)
        return self.graphs.tokens

    @staticmethod
    def _copies_and_rows(step: StepInputs) -> list[np.ndarray]:
        return [step.block_copies[:, 0], step.block_copies[:, 1], step.logit_rows]

    @torch.inference_mode()
    def follow(self, step: StepInputs) -> None:
        """A worker rank's part of a step: the forward, then the tokens rank 0 sampled, or in a plain
        decode step this rank's share of the draw (the next decode may read them on the device)."""
        logits, _ = self.execute(step, [])
        if step.vocab_parallel:
            params = torch.empty(len(step.logit_rows), 4, dtype=torch.int64, device=self.device)
            self.prev_tokens = self._keep(self._vocab_parallel_tokens(logits, self.tp.broadcast(params)))
        elif len(step.logit_rows):
            tokens = torch.empty(len(step.logit_rows), dtype=torch.int64, device=self.device)
            self.prev_tokens = self._keep(self.tp.broadcast(tokens))

    def _vocab_parallel_tokens(self, logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Every rank: the tokens drawn from every rank's vocabulary shard, given rank 0's per-row
        noise keys, inverse temperatures (float32 bits) and greedy flags, params [B, 4] int64."""
        inv_t, greedy = params[:, 2].int().view(torch.float32), params[:, 3].bool()
        scores, tokens = sample_vocab_shard(logits, inv_t, greedy, params[:, :2], self.model.lm_head.start,
                                            self.hf_config.vocab_size)
        shards = self.tp.all_gather(torch.stack([scores.view(torch.int32).long(), tokens]))
        return best_of_shards(shards[:, 0].int().view(torch.float32), shards[:, 1])

    def execute(self, step: StepInputs, extra: list[np.ndarray]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Every rank: upload `step` with the `extra` arrays in one copy, block copies, then the forward
        (a CUDA graph's without the LM head, or eager). Returns the logits of the step's logit rows on
        rank 0 (None on other ranks, or when nothing is sampled; with `step.vocab_parallel`, each
        rank's shard of them), and `extra` on the device."""
        if step.graphed:
            copy_src, copy_dst, rows_t, *uploaded = self.graphs.load(self.upload, step, None,
                                                                      [*self._copies_and_rows(step), *extra])
        else:
            inputs = [step.input_ids, step.prev_rows, *self._copies_and_rows(step), *step.layout.arrays()]
            tensors = self.upload(inputs + extra)
            (ids, src, copy_src, copy_dst, rows_t, *meta_tensors), uploaded = tensors[: len(inputs)], \
                tensors[len(inputs) :]
        if len(step.block_copies):
            self.kv_cache.copy_blocks(copy_src, copy_dst)
        if step.graphed:
            hidden = self.graphs.replay(step)
            hidden = hidden[: step.num_seqs] if step.is_decode else hidden
        else:
            positions, meta = step.layout.metadata(meta_tensors)
            if len(step.prev_rows):
                ids = torch.where(src >= 0, self.prev_tokens[src.clamp(min=0)], ids)
            hidden = self.model(ids, positions, meta)
        if not len(step.logit_rows):
            return None, uploaded
        if not step.is_decode:
            hidden = hidden[rows_t]
        return self.model.compute_logits(hidden, gather=not step.vocab_parallel), uploaded

    @staticmethod
    def _sampling_rows(batch: ScheduledBatch, query_start_loc: np.ndarray) -> tuple[list[SamplingRow], np.ndarray]:
        """The rows to sample and the query token whose logits each reads: a sampling sequence's
        last token, and in a speculative step also each proposal (`VerifyRow`: the sequence up
        to that position)."""
        rows: list[SamplingRow] = []
        logit_rows: list[int] = []
        for i, seq in enumerate(batch.seqs):
            count = batch.sample_counts[i]
            if count == 1:
                rows.append(seq)
            else:
                rows += [VerifyRow(seq, seq.num_tokens - count + 1 + j) for j in range(count)]
            logit_rows += range(query_start_loc[i + 1] - count, query_start_loc[i + 1])
        return rows, np.asarray(logit_rows, dtype=np.int64)

    def _sampling_tensors(self, rows: list[SamplingRow]) -> SamplingTensors:
        return SamplingTensors.from_rows(rows, self.hf_config.vocab_size, self.config.eos_token_ids, self.device,
                                         self.upload)
