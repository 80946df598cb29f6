"""Runs the model on a scheduled batch: flat inputs, the forward over the paged cache, sampling."""
from __future__ import annotations

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from nanovllm.models import model_class
from nanovllm.models.llama import head_dim_of
from nanovllm.utils.loader import load_dummy, load_model


class ModelRunner:
    """Owns the model, the KV cache and the sampler on one device."""

    def __init__(self, config: Config, eos_token_ids: list[int]):
        self.config = config
        self.hf_config = config.hf_config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.eos_token_ids = eos_token_ids
        torch.manual_seed(config.seed)
        self.model = self._build_model()
        self.block_size = config.kvcache_block_size or 16
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = config.num_kvcache_blocks or self._num_blocks_from_memory()
        self.kv_cache = self._allocate_kv_cache()
        self.sampler = Sampler()

    def _build_model(self) -> torch.nn.Module:
        with torch.device(self.device):
            model = model_class(self.hf_config)(self.hf_config)
        if self.config.load_format == "dummy":
            load_dummy(model, self.config.seed)
        else:
            load_model(model, self.config.model)
        return model.to(self.dtype).eval()

    def _bytes_per_block(self) -> int:
        cfg = self.hf_config
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        per_token = 2 * cfg.num_hidden_layers * num_kv_heads * head_dim_of(cfg) * self.dtype.itemsize
        return per_token * self.block_size

    def _num_blocks_from_memory(self) -> int:
        """Blocks that fit the CPU budget, capped at what max_num_seqs full-length sequences need."""
        budget = self.config.kv_cache_memory_bytes // self._bytes_per_block()
        blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        num_blocks = min(budget, self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={self.config.kv_cache_memory_bytes} holds no block "
                             f"of {self._bytes_per_block()} bytes")
        return num_blocks

    def _allocate_kv_cache(self) -> torch.Tensor:
        cfg = self.hf_config
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        shape = (len(self.attention_layers), 2, self.num_blocks, self.block_size, num_kv_heads, head_dim_of(cfg))
        kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for layer, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
        return kv_cache

    # -- inputs ---------------------------------------------------------------

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        input_ids, positions, slots, context_lens, cu_q, cu_k, logit_rows = [], [], [], [], [0], [0], []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            pos = np.arange(start, end)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table)[pos // bs] * bs + pos % bs)
            context_lens.append(end)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            if batch.samples(i):
                logit_rows.append(cu_q[-1] - 1)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]
        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=self._tensor(np.concatenate(slots), torch.int64),
            context_lens=self._tensor(context_lens, torch.int32),
            block_tables=self._tensor(block_tables, torch.int32),
            max_context_len=max(context_lens),
            cu_seqlens_q=self._tensor(cu_q, torch.int32),
            cu_seqlens_k=self._tensor(cu_k, torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            has_cached_prefix=any(seq.num_cached_tokens > 0 for seq in batch.seqs),
        )
        return (self._tensor(input_ids, torch.int64), self._tensor(np.concatenate(positions), torch.int64),
                meta, self._tensor(logit_rows, torch.int64))

    def _tensor(self, data: object, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(data), dtype=dtype).to(self.device, non_blocking=True)

    # -- running --------------------------------------------------------------

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer before the forward writes."""
        if copies:
            src, dst = (self._tensor(c, torch.int64) for c in zip(*copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Forward the batch; sample for the sequences whose tokens are now all computed."""
        self.copy_blocks(batch.block_copies)
        input_ids, positions, meta, logit_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        sampling = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        if not sampling:
            return None
        logits = self.model.compute_logits(hidden[logit_rows])
        tensors = SamplingTensors.from_sequences(sampling, logits.shape[-1], self.eos_token_ids, self.device)
        return self.sampler(logits, tensors)
