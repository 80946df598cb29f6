"""Llama (2, 3, Mistral-style configs); also the base of the Qwen2 and Qwen3 models."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.distributed.parallel_state import SINGLE, TensorParallel
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_parameters


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """Self-attention with fused QKV; `qk_norm` adds Qwen3's per-head RMSNorm on q and k.

    Split by heads across tensor-parallel ranks: this rank's query heads and the KV heads they read.
    """

    def __init__(self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        total_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          total_kv_heads, qkv_bias, tp)
        self.num_heads = tp.split(config.num_attention_heads)
        self.num_kv_heads = self.qkv_proj.local_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False), tp, reduce_results=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, rope_parameters(config))
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads)
        if qk_norm:  # applied by rotary_emb, in its kernel on CUDA
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else None
        q, k = self.rotary_emb(positions, q, k, norm)  # on CUDA one kernel for the norms and RoPE
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TensorParallel):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias,
                                                       tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp,
                                           reduce_results=False)
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: silu")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm, tp)
        self.mlp = LlamaMLP(config, tp)
        # o_proj's and down_proj's outputs reach the norms after them un-reduced: each norm all-reduces
        # its x (fused with the add and the norm where it can), the layer's two all-reduces
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, qk_norm, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """A decoder-only model; subclasses switch QKV bias and q/k norm."""

    qkv_bias = False
    qk_norm = False
    # HF checkpoint name -> (our fused parameter, shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, qkv_bias, self.qk_norm, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 (the one that samples); None on the other ranks. Without
        `gather`: each rank's shard of the vocabulary."""
        return self.lm_head(hidden, gather)
