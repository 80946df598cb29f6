"""Shared fixtures: tiny random HF models saved to disk, and HF's greedy continuation.

Without CUDA the Triton kernels run in Triton's interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a kernel, so it is set here, before any test imports
nanovllm. Three gaps of Triton 3.6's interpreter are bridged (CPU only, GPU runs are untouched):
``range()`` over kernel scalars with numpy >= 2.3, ``tl.dot`` on bfloat16, and float narrowing
(it truncates to bfloat16 and drops the rounding carry into the exponent for fp8), done here by
torch, which rounds to nearest even as the GPU does.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import triton.language as tl
    from triton.runtime import interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor
    _create_dot = interpreter.InterpreterBuilder.create_dot

    def _patch_with_scalar_index(tensor, scope) -> None:
        """Scalars are 1-element arrays that ``int()`` refuses for numpy >= 2.3 (1-D, not 0-D)."""
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def _as_float32(handle):
        """bfloat16 is held as its raw uint16 bits; widen the bits to float32 so matmul sees numbers."""
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(bits, tl.float32)

    def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return _create_dot(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)

    _TORCH_FLOATS = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16,
                     tl.float8e4nv: torch.float8_e4m3fn}
    _convert_float = interpreter._convert_float

    def _convert_float_by_torch(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype not in _TORCH_FLOATS or output_dtype not in _TORCH_FLOATS:
            return _convert_float(data, input_dtype, output_dtype, rounding_mode)
        width = lambda dtype: f"uint{dtype.primitive_bitwidth}"  # noqa: E731
        bits = torch.from_numpy(np.ascontiguousarray(data).view(width(input_dtype)).copy())
        out = bits.view(_TORCH_FLOATS[input_dtype]).to(_TORCH_FLOATS[output_dtype])
        return out.view(getattr(torch, width(output_dtype))).numpy()

    interpreter._convert_float = _convert_float_by_torch
    interpreter._patch_lang_tensor = _patch_with_scalar_index
    interpreter.InterpreterBuilder.create_dot = _create_dot_bf16




TINY = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.08)

# name -> (config class, model class, overrides); together: GQA and MHA, head dims 64 and 128,
# q/k norm, qkv bias, llama3 rope scaling.
TINY_MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=2, num_key_value_heads=1,
              rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=128))),
    "llama-hd128": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True)),
}


def build_tiny_model(name: str, path: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, model_cls, overrides = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """name -> (directory, HF model) for a tiny random model, built once per session."""
    cache: dict[str, tuple[str, transformers.PreTrainedModel]] = {}

    def get(name: str) -> tuple[str, transformers.PreTrainedModel]:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            cache[name] = (path, build_tiny_model(name, path))
        return cache[name]

    return get


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = TINY["vocab_size"]) -> list[list[int]]:
    """Random token-id prompts of the given lengths, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation, EOS ignored (min_new_tokens = max_new_tokens)."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
