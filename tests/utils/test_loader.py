"""Checkpoint loading: sharded safetensors with an index, clear errors for bad directories."""
import json
import os
import shutil

import pytest
import torch
from conftest import build_tiny_model, hf_greedy

from nanovllm import LLM, SamplingParams


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf_model = build_tiny_model("qwen2", str(tmp_path / "single"))
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    llm = LLM(str(tmp_path / "sharded"), skip_tokenizer_init=True, device="cpu")
    prompt = torch.randint(0, 384, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, prompt, 16)


def test_missing_weights_and_architecture_errors(tmp_path):
    build_tiny_model("llama", str(tmp_path / "m"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(tmp_path / "m" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(empty), skip_tokenizer_init=True, device="cpu")
    config = json.loads((empty / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(empty), skip_tokenizer_init=True, device="cpu")


def test_dummy_weights_need_no_files():
    llm = LLM("preset:qwen3-0.6b", load_format="dummy", device="cpu", max_model_len=64, num_kvcache_blocks=8,
              dtype="bfloat16", max_num_seqs=2)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
