"""Engine configuration: sliding-window models are refused unless full attention equals them."""
from __future__ import annotations

import os
import re

import pytest
import torch
import transformers
from conftest import TINY, hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config, load_hf_config

WINDOW = 64
HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


def save_config(path, config_cls: str, **overrides) -> str:
    config = getattr(transformers, config_cls)(**{**TINY, **HEADS, **overrides})
    config.architectures = [config_cls.replace("Config", "ForCausalLM")]
    config.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("config_cls", "window_args"), [
    ("MistralConfig", dict(sliding_window=WINDOW)),
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
])
def test_used_sliding_window_needs_max_model_len_within_it(tmp_path, config_cls, window_args):
    path = save_config(tmp_path, config_cls, **window_args)
    with pytest.raises(ValueError, match=f"sliding.window.*set max_model_len <= {WINDOW}"):
        Config(path)  # max_model_len defaults to max_position_embeddings (1024)
    with pytest.raises(ValueError, match=f"set max_model_len <= {WINDOW}"):
        Config(path, max_model_len=WINDOW + 1)
    assert Config(path, max_model_len=WINDOW).max_model_len == WINDOW


@pytest.mark.parametrize(("config_cls", "window_args"), [
    ("MistralConfig", dict(sliding_window=None)),
    ("Qwen2Config", dict(use_sliding_window=False, sliding_window=WINDOW, max_window_layers=0)),
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),  # no layer slides
    ("Qwen3Config", dict(use_sliding_window=False, sliding_window=WINDOW)),
])
def test_unused_sliding_window_is_full_attention(tmp_path, config_cls, window_args):
    path = save_config(tmp_path, config_cls, **window_args)
    assert Config(path).max_model_len == TINY["max_position_embeddings"]


def test_accepted_window_config_matches_hf(tmp_path):
    """Mistral with max_model_len <= its window: full attention gives HF's (windowed) greedy tokens."""
    config = transformers.MistralConfig(**{**TINY, **HEADS, "sliding_window": WINDOW})
    torch.manual_seed(0)
    hf_model = transformers.MistralForCausalLM(config).float().eval()
    hf_model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu", max_model_len=WINDOW)
    params = SamplingParams(temperature=0, max_tokens=WINDOW - 40, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (40, 7)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, prompt in zip(outputs, prompts):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, params.max_tokens)


def test_model_may_be_a_path_like(tmp_path):
    save_config(tmp_path, "Qwen3Config")
    for model in (tmp_path, os.fspath(tmp_path)):
        config = Config(model)
        assert config.model == str(tmp_path) and config.hf_config.model_type == "qwen3"
    assert load_hf_config(tmp_path).model_type == "qwen3"
    with pytest.raises(TypeError, match="model must be a str or os.PathLike, got int"):
        Config(3)


@pytest.mark.parametrize(("size", "message"), [
    (0, "tensor_parallel_size must be an int >= 1, got 0"),
    ("2", "tensor_parallel_size must be an int >= 1, got '2'"),
    (1.0, "tensor_parallel_size must be an int >= 1, got 1.0"),
    (3, "tensor_parallel_size=3 must divide the model's 4 attention heads"),
    (8, "tensor_parallel_size=8 must divide the model's 4 attention heads"),
])
def test_bad_tensor_parallel_size_is_refused_before_any_work(tiny_model, size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(tiny_model("qwen3")[0], device="cpu", tensor_parallel_size=size)


def test_fp8_sink_blocks_need_an_fp8_cache(tiny_model):
    path = tiny_model("qwen3")[0]
    with pytest.raises(ValueError, match="fp8_sink_blocks=True needs kv_cache_dtype='fp8', got 'auto'"):
        Config(path, device="cpu", fp8_sink_blocks=True)
    assert Config(path, device="cpu", kv_cache_dtype="fp8", fp8_sink_blocks=True).fp8_sink_blocks


def test_tensor_parallel_size_must_split_or_replicate_kv_heads(tmp_path):
    """12 query / 8 KV heads: 4 ranks split both; 3 ranks split the query heads, but the KV heads can be
    neither split nor replicated (one per rank) evenly."""
    path = save_config(tmp_path, "Qwen3Config", num_attention_heads=12, num_key_value_heads=8, head_dim=16)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 8 KV heads"):
        Config(path, device="cpu", tensor_parallel_size=3)
    assert Config(path, device="cpu", tensor_parallel_size=4).tensor_parallel_size == 4


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs fewer than 64 GPUs")
def test_tensor_parallel_size_over_visible_gpus_is_refused(tmp_path):
    path = save_config(tmp_path, "Qwen3Config", num_attention_heads=64, num_key_value_heads=64, head_dim=2)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size=64 is over the {torch.cuda.device_count()} "
                                         r"visible CUDA GPUs"):
        Config(path, device="cuda", tensor_parallel_size=64)


def test_draft_model_speculation_is_refused_with_tensor_parallelism(tiny_model):
    path = tiny_model("qwen3")[0]
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="draft model is not supported with tensor_parallel_size=2"):
        Config(path, device="cpu", tensor_parallel_size=2, speculative_config=spec)
