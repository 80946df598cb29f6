"""Model registry: HF `architectures` name -> our implementation."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The class implementing config's architecture; a clear error if we have none."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture(s) {getattr(config, 'architectures', None)}; supported: {sorted(MODEL_REGISTRY)}"
    )
