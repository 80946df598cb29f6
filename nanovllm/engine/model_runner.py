"""Runs the model on a scheduled batch: flat inputs, the forward over the paged cache, sampling."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.cuda_graph import DecodeGraphs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.layers.attention import Attention, AttentionMetadata, select_backend
from nanovllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from nanovllm.models import model_class
from nanovllm.models.llama import head_dim_of
from nanovllm.utils.loader import load_dummy, load_model

logger = logging.getLogger(__name__)


@dataclass
class SampledTokens:
    """A step's sampled tokens on the host, row by row as in the batch's sampling sequences."""

    token_ids: list[int]
    logprobs: list[float]
    top_token_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


class PendingSample:
    """Sampled tokens on their way to the host; `wait` blocks until they are there."""

    def __init__(self, out: SamplerOutput | None):
        self.out = out
        self.event = None
        if out is not None and out.token_ids.is_cuda:
            self.out = SamplerOutput(*(t.to("cpu", non_blocking=True) if t is not None else None
                                       for t in (out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)))
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> SampledTokens | None:
        if self.out is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        out = self.out
        top = out.top_token_ids is not None
        return SampledTokens(out.token_ids.tolist(), out.logprobs.tolist(),
                             out.top_token_ids.tolist() if top else None, out.top_logprobs.tolist() if top else None)


class ModelRunner:
    """Owns the model, the KV cache and the sampler on one device."""

    def __init__(self, config: Config, eos_token_ids: list[int]):
        self.config = config
        self.hf_config = config.hf_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.eos_token_ids = eos_token_ids
        torch.manual_seed(config.seed)
        self.backend = select_backend(config.attention_backend, self.device, self.dtype)
        self.block_size = self._block_size()
        self.model = self._build_model()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for attn in self.attention_layers:
            attn.backend = self.backend
        self.sampler = Sampler()
        self.staging = torch.empty(0, dtype=torch.int64)
        self.staging_free = torch.cuda.Event() if self.device.type == "cuda" else None
        # the last launched step's sampled tokens, still on the device, and each sequence's row in them
        self.prev_tokens = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.prev_rows: dict[int, int] = {}
        self.num_blocks = config.num_kvcache_blocks or self._num_blocks_from_memory()
        self.kv_cache = self._allocate_kv_cache()
        self.graphs = self._capture_graphs()

    def _block_size(self) -> int:
        multiple = self.backend.block_size_multiple
        size = self.config.kvcache_block_size or max(16, multiple)
        if size % multiple:
            raise ValueError(f"kvcache_block_size={size} must be a multiple of {multiple} with the "
                             f"{type(self.backend).__name__} (flash-attn 2's paged kernels need it)")
        return size

    def _build_model(self) -> torch.nn.Module:
        with torch.device(self.device):
            model = model_class(self.hf_config)(self.hf_config)
        if self.config.load_format == "dummy":
            load_dummy(model, self.config.seed)
        else:
            load_model(model, self.config.model)
        return model.to(self.dtype).eval()

    # -- the KV cache -----------------------------------------------------------

    def _kv_shape(self, num_blocks: int) -> tuple[int, ...]:
        cfg = self.hf_config
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return (len(self.attention_layers), 2, num_blocks, self.block_size, num_kv_heads, head_dim_of(cfg))

    def _bytes_per_block(self) -> int:
        return int(np.prod(self._kv_shape(1))) * self.dtype.itemsize

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
        if num_blocks < 1:
            raise ValueError(f"no memory left for a KV block of {self._bytes_per_block()} bytes "
                             f"(budget {budget} bytes); lower max_num_batched_tokens or raise the memory limit")
        return num_blocks

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

        The prefill runs over a scratch cache just big enough for it, so any backend can read it back.
        """
        num_tokens, bs = self.config.max_num_batched_tokens, self.block_size
        seq_len = min(self.config.max_model_len, num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks = [-(-n // bs) for n in lens]
        scratch = torch.zeros(self._kv_shape(sum(blocks)), dtype=self.dtype, device=self.device)
        self._bind_cache(scratch)
        tables = np.zeros((len(lens), max(blocks)), dtype=np.int64)
        first = np.cumsum([0] + blocks)
        for i, n in enumerate(blocks):
            tables[i, :n] = np.arange(first[i], first[i] + n)
        positions = np.concatenate([np.arange(n) for n in lens])
        seq_of_token = np.repeat(np.arange(len(lens)), lens)
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        cu = np.cumsum([0] + lens)
        ids, pos, slot, ctx, cu_t, table_t = self._upload(
            np.random.randint(0, self.hf_config.vocab_size, num_tokens), positions, slots, np.asarray(lens), cu, tables)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=slot, context_lens=ctx.int(),
                                 block_tables=table_t.int(), max_context_len=max(lens), cu_seqlens_q=cu_t.int(),
                                 cu_seqlens_k=cu_t.int(), max_seqlen_q=max(lens))
        self.model(ids, pos, meta)
        seqs = [Sequence([0]) for _ in range(self.config.max_num_seqs)]
        hidden = torch.randn(len(seqs), self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        logits = self.model.compute_logits(hidden)
        self.sampler(logits, SamplingTensors.from_sequences(seqs, logits.shape[-1], [], self.device))
        del scratch
        torch.cuda.synchronize(self.device)

    def _allocate_kv_cache(self) -> torch.Tensor:
        kv_cache = torch.zeros(self._kv_shape(self.num_blocks), dtype=self.dtype, device=self.device)
        self._bind_cache(kv_cache)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, kv_cache.numel() * kv_cache.element_size() / 2**30)
        return kv_cache

    def _bind_cache(self, kv_cache: torch.Tensor) -> None:
        for layer, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = kv_cache[layer, 0], kv_cache[layer, 1]

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.backend.supports_cuda_graphs:
            return None
        blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        return DecodeGraphs(self.model, min(self.config.max_num_seqs, 512), blocks_per_seq,
                            self.hf_config.hidden_size, self.dtype, self.config.max_model_len, self.device)

    # -- inputs -----------------------------------------------------------------

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Int arrays to the device in one copy, through a pinned staging buffer on CUDA."""
        flat = np.concatenate([a.ravel() for a in arrays]).astype(np.int64, copy=False)
        if self.device.type == "cpu":
            tensor = torch.from_numpy(flat)
        else:
            self.staging_free.synchronize()  # the previous copy out of the buffer is done
            if self.staging.numel() < flat.size:
                self.staging = torch.empty(2 * flat.size, dtype=torch.int64).pin_memory()
            self.staging[: flat.size].numpy()[:] = flat
            tensor = self.staging[: flat.size].to(self.device, non_blocking=True)
            self.staging_free.record()
        tensors, offset = [], 0
        for a in arrays:
            tensors.append(tensor[offset : offset + a.size].view(a.shape))
            offset += a.size
        return tensors

    def _block_table_array(self, batch: ScheduledBatch, rows: int) -> np.ndarray:
        width = max(len(seq.block_table) for seq in batch.seqs)
        table = np.zeros((rows, width), dtype=np.int64)
        for i, seq in enumerate(batch.seqs):
            table[i, : len(seq.block_table)] = seq.block_table
        return table

    def _prepare_prefill(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat inputs of a prefill, and the rows whose hidden states give next-token logits."""
        bs = self.block_size
        input_ids, positions, slots, context_lens = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            assert PLACEHOLDER not in seq.token_ids[start:end], "prefill of a token not read back yet"
            pos = np.arange(start, end)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table)[pos // bs] * bs + pos % bs)
            context_lens.append(end)
        cu_q = np.cumsum([0] + batch.num_new_tokens)
        cu_k = np.cumsum([0] + context_lens)
        logit_rows = [cu_q[i + 1] - 1 for i in range(len(batch.seqs)) if batch.samples(i)]
        ids, pos, slot, lens, cu_q_t, cu_k_t, tables, rows = self._upload(
            np.asarray(input_ids), np.concatenate(positions), np.concatenate(slots), np.asarray(context_lens),
            cu_q, cu_k, self._block_table_array(batch, len(batch.seqs)), np.asarray(logit_rows, dtype=np.int64))
        meta = AttentionMetadata(
            is_prefill=True, slot_mapping=slot, context_lens=lens.int(), block_tables=tables.int(),
            max_context_len=max(context_lens), cu_seqlens_q=cu_q_t.int(), cu_seqlens_k=cu_k_t.int(),
            max_seqlen_q=max(batch.num_new_tokens),
            has_cached_prefix=any(seq.num_cached_tokens > 0 for seq in batch.seqs))
        return ids, pos, meta, rows

    def _decode_arrays(self, batch: ScheduledBatch, rows: int) -> list[np.ndarray]:
        """Per-row input id (or its row in prev_tokens, else -1), position, slot and context length.

        Padding rows write nowhere and attend to nothing.
        """
        bs, n = self.block_size, len(batch.seqs)
        lens = np.zeros(rows, dtype=np.int64)
        lens[:n] = [seq.num_tokens for seq in batch.seqs]
        ids = np.zeros(rows, dtype=np.int64)
        ids[:n] = [seq.token_ids[-1] for seq in batch.seqs]
        src = np.full(rows, -1, dtype=np.int64)
        src[:n] = [self.prev_rows.get(seq.seq_id, -1) if seq.token_ids[-1] == PLACEHOLDER else -1
                   for seq in batch.seqs]
        slots = np.full(rows, -1, dtype=np.int64)
        slots[:n] = [seq.block_table[(length - 1) // bs] * bs + (length - 1) % bs
                     for seq, length in zip(batch.seqs, lens[:n].tolist())]
        return [ids, src, np.maximum(lens - 1, 0), slots, lens]

    def _input_ids(self, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Known ids, with placeholders replaced by the previous step's tokens on the device."""
        return torch.where(src >= 0, self.prev_tokens[src.clamp(min=0)], ids)

    # -- running ----------------------------------------------------------------

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer before the forward writes."""
        if copies:
            src, dst = self._upload(np.asarray([c[0] for c in copies]), np.asarray([c[1] for c in copies]))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _forward_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        graphed = self.graphs is not None and n <= self.graphs.sizes[-1]
        rows = self.graphs.bucket(n) if graphed else n
        ids, src, pos, slots, lens, tables = self._upload(*self._decode_arrays(batch, rows),
                                                          self._block_table_array(batch, rows))
        ids = self._input_ids(ids, src)
        if graphed:
            return self.graphs.run(ids, pos, slots, lens, tables, n)
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slots, context_lens=lens.int(),
                                 block_tables=tables.int(), max_context_len=max(s.num_tokens for s in batch.seqs))
        return self.model(ids, pos, meta)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> PendingSample:
        """Queue the batch's forward and sampling on the device; the tokens come back through `wait`.

        Sampling covers the sequences whose tokens are all computed after this step.
        """
        self.copy_blocks(batch.block_copies)
        sampling = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        if batch.is_prefill:
            input_ids, positions, meta, logit_rows = self._prepare_prefill(batch)
            hidden = self.model(input_ids, positions, meta)
            if not sampling:
                return PendingSample(None)
            hidden = hidden[logit_rows]
        else:
            hidden = self._forward_decode(batch)
        logits = self.model.compute_logits(hidden)
        tensors = SamplingTensors.from_sequences(sampling, logits.shape[-1], self.eos_token_ids, self.device)
        out = self.sampler(logits, tensors)
        self.prev_tokens = out.token_ids
        self.prev_rows = {seq.seq_id: row for row, seq in enumerate(sampling)}
        return PendingSample(out)
