from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with a per-head RMSNorm on q and k before rotary embedding."""

    qk_norm = True
